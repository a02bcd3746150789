"""A fine-tune's settings: what they refuse, and the privacy record they and the sites' answers produce."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from coordinator.finetune_config import FinetuneSettings
from coordinator.finetune_site_privacy import SitesPrivacy, floor_text
from protocol.finetune_privacy import Refusal, SiteFloor, noise_multiplier, rdp_epsilon


def test_secure_aggregation_needs_two_sites_and_enough_shares(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="min_sites >= 2"):
        FinetuneSettings(checkpoint=tmp_path, out=tmp_path, min_sites=1)
    with pytest.raises(ValidationError, match="shares cannot be rebuilt"):
        FinetuneSettings(checkpoint=tmp_path, out=tmp_path, min_sites=4, secagg_shares=2, secagg_threshold=3)
    settings = FinetuneSettings(checkpoint=tmp_path, out=tmp_path, min_sites=4)
    assert (settings.shares, settings.threshold) == (4, 3)  # one site may drop out mid-round
    assert FinetuneSettings(checkpoint=tmp_path, out=tmp_path, min_sites=1, secagg=False).privacy() == {
        "secure_aggregation": None, "differential_privacy": None}


def test_the_dp_record_states_the_noise_and_the_guarantee_by_rdp_beside_basic_composition(tmp_path: Path) -> None:
    settings = FinetuneSettings(checkpoint=tmp_path, out=tmp_path, rounds=5, dp_epsilon=2.0, dp_delta=1e-5, dp_clip=0.5)
    dp = settings.privacy()["differential_privacy"]
    assert dp["sensitivity"] == 1.0
    assert dp["noise_multiplier"] == pytest.approx(math.sqrt(2 * math.log(1.25e5)) / 2.0)
    assert dp["noise_stddev"] == pytest.approx(dp["noise_multiplier"])  # sensitivity 1
    assert dp["basic_composition"] == {"epsilon_total": 10.0, "delta_total": pytest.approx(5e-5)}
    # The accountant's five rounds cost less than their sum, at a smaller delta (the run's, not five times it).
    assert dp["epsilon_total"] == pytest.approx(rdp_epsilon([dp["noise_multiplier"]] * 5, 1e-5))
    assert 2.0 < dp["epsilon_total"] < 0.7 * 10.0 and dp["delta_total"] == 1e-5


def test_the_record_lists_each_sites_floor_its_refusals_and_the_epsilon_it_spent(tmp_path: Path) -> None:
    settings = FinetuneSettings(checkpoint=tmp_path, out=tmp_path, rounds=2, secagg=False, dp_epsilon=8.0)
    sites = SitesPrivacy(settings)
    floor = SiteFloor(require_secagg=True, max_epsilon=30)
    for server_round in (1, 2):
        sites.answered(server_round, {"site": "energy", "train_loss": 1.0, "floor": SiteFloor().to_json(),
                                      "epsilon_all_runs": 40.0})
        sites.refused(Refusal("careful", server_round, "secagg", "it requires SecAgg+", floor))
    sites.answered(1, {"site": "bank", "train_loss": 1.0, "floor": SiteFloor().to_json(), "epsilon_all_runs": 8.5})
    record = sites.record()
    z = noise_multiplier(8.0, 1e-5)
    assert record["energy"]["rounds"] == [1, 2] and record["energy"]["epsilon_all_runs"] == 40.0
    assert record["energy"]["epsilon_this_run"] == pytest.approx(rdp_epsilon([z, z], 1e-5))
    assert record["bank"]["epsilon_this_run"] == pytest.approx(rdp_epsilon([z], 1e-5))
    assert record["careful"]["floor"] == {"require_secagg": True, "max_epsilon": 30, "delta": 1e-5}
    assert record["careful"]["rounds"] == [] and record["careful"]["epsilon_this_run"] == 0.0
    assert [r["round"] for r in record["careful"]["refused"]] == [1, 2]
    assert floor_text(record["careful"]["floor"]) == "requires SecAgg+, at most epsilon 30 (delta 1e-05) over all its rounds"


def test_settings_survive_their_file_and_a_bad_file_is_refused(tmp_path: Path) -> None:
    settings = FinetuneSettings(checkpoint=tmp_path / "base", out=tmp_path / "out", dp_epsilon=1.0)
    settings.save(tmp_path / "settings.json")
    assert FinetuneSettings.load(tmp_path / "settings.json") == settings
    (tmp_path / "bad.json").write_text('{"checkpoint": "x", "out": "y", "rounds": 0}')
    with pytest.raises(ValidationError, match="rounds"):
        FinetuneSettings.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="cannot read"):
        FinetuneSettings.load(tmp_path / "absent.json")
