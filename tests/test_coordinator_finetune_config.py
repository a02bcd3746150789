"""A fine-tune's settings: what they refuse, and the privacy record they produce."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from coordinator.finetune_config import FinetuneSettings


def test_secure_aggregation_needs_two_sites_and_enough_shares(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="min_sites >= 2"):
        FinetuneSettings(checkpoint=tmp_path, out=tmp_path, min_sites=1)
    with pytest.raises(ValidationError, match="shares cannot be rebuilt"):
        FinetuneSettings(checkpoint=tmp_path, out=tmp_path, min_sites=4, secagg_shares=2, secagg_threshold=3)
    settings = FinetuneSettings(checkpoint=tmp_path, out=tmp_path, min_sites=4)
    assert (settings.shares, settings.threshold) == (4, 3)  # one site may drop out mid-round
    assert FinetuneSettings(checkpoint=tmp_path, out=tmp_path, min_sites=1, secagg=False).privacy() == {
        "secure_aggregation": None, "differential_privacy": None}


def test_the_dp_record_states_the_noise_and_the_composed_guarantee(tmp_path: Path) -> None:
    settings = FinetuneSettings(checkpoint=tmp_path, out=tmp_path, rounds=5, dp_epsilon=2.0, dp_delta=1e-5, dp_clip=0.5)
    dp = settings.privacy()["differential_privacy"]
    assert dp["sensitivity"] == 1.0
    assert dp["noise_stddev"] == pytest.approx(math.sqrt(2 * math.log(1.25e5)) / 2.0)
    assert (dp["epsilon_total"], dp["delta_total"]) == (10.0, pytest.approx(5e-5))


def test_settings_survive_their_file_and_a_bad_file_is_refused(tmp_path: Path) -> None:
    settings = FinetuneSettings(checkpoint=tmp_path / "base", out=tmp_path / "out", dp_epsilon=1.0)
    settings.save(tmp_path / "settings.json")
    assert FinetuneSettings.load(tmp_path / "settings.json") == settings
    (tmp_path / "bad.json").write_text('{"checkpoint": "x", "out": "y", "rounds": 0}')
    with pytest.raises(ValidationError, match="rounds"):
        FinetuneSettings.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="cannot read"):
        FinetuneSettings.load(tmp_path / "absent.json")
