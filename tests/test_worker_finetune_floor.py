"""A site's privacy floor, enforced on the site (worker.finetune_floor): which rounds it refuses, and its ledger."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from protocol.finetune import SiteInstructions
from protocol.finetune_privacy import SiteFloor, noise_multiplier, rdp_epsilon
from worker.finetune_floor import FloorRefused, PrivacyLedger, admit_evaluation, admit_round

ROUND = SiteInstructions(base_digest="d" * 64, server_round=1, local_steps=5, batch_size=8, learning_rate=1e-3,
                         max_tokens=96, lora_rank=8, lora_alpha=16, lora_targets="q_proj,v_proj",
                         dp_epsilon=4.0, dp_delta=1e-5, dp_clip=1.0)


def node_config(tmp_path: Path, floor: SiteFloor) -> dict:
    """What `essaim finetune site` gives the SuperNode."""
    return {"name": "careful", "data": "private.jsonl", "checkpoint": "base",
            "privacy_ledger": str(tmp_path / "privacy-ledger.jsonl"), **floor.to_node_config()}


def test_a_site_requiring_secagg_refuses_a_round_without_it_and_says_what_to_change(tmp_path: Path) -> None:
    config = node_config(tmp_path, SiteFloor(require_secagg=True))
    with pytest.raises(FloorRefused) as refused:
        admit_round(config, ROUND, secagg=False, run_id=7)
    assert refused.value.refusal.rule == "secagg"
    message = str(refused.value)
    assert message.startswith("site careful refuses round 1: it requires SecAgg+ (--require-secagg)")
    assert "without --no-secagg" in message
    assert not (tmp_path / "privacy-ledger.jsonl").exists()  # nothing spent for a refused round
    admit_round(config, ROUND, secagg=True, run_id=7)  # the same round under SecAgg+ is taken


def test_a_site_with_an_epsilon_ceiling_refuses_a_round_without_dp(tmp_path: Path) -> None:
    config = node_config(tmp_path, SiteFloor(max_epsilon=50))
    with pytest.raises(FloorRefused, match=r"adds no differential-privacy noise.*--dp-epsilon E") as refused:
        admit_round(config, replace(ROUND, dp_epsilon=0.0), secagg=True, run_id=7)
    assert refused.value.refusal.rule == "no-dp"


def test_a_site_answers_rounds_until_the_next_would_cross_its_ceiling_even_across_runs_and_restarts(
    tmp_path: Path
) -> None:
    z = noise_multiplier(ROUND.dp_epsilon, ROUND.dp_delta)
    ceiling = (rdp_epsilon([z] * 3, 1e-5) + rdp_epsilon([z] * 4, 1e-5)) / 2  # three rounds fit, not four
    config = node_config(tmp_path, SiteFloor(max_epsilon=ceiling))
    admit_round(config, ROUND, secagg=True, run_id=1)
    admit_round(config, replace(ROUND, server_round=2), secagg=True, run_id=1)
    # Another run, and a SuperNode restarted: the ledger on disk still holds the first two rounds.
    admit_round(dict(config), replace(ROUND, server_round=1), secagg=True, run_id=2)
    with pytest.raises(FloorRefused) as refused:
        admit_round(config, replace(ROUND, server_round=2), secagg=True, run_id=2)
    refusal = refused.value.refusal
    assert (refusal.rule, refusal.round) == ("epsilon", 2)
    assert f"{rdp_epsilon([z] * 4, 1e-5):.3g} (RDP accountant" in refusal.reason
    assert "in 3 earlier round(s)" in refusal.reason
    # The advice is right: a round at the epsilon it names fits, a larger one does not.
    fits = float(refusal.reason.split("a round at --dp-epsilon ")[1].split(" ")[0])
    spent = PrivacyLedger(tmp_path / "privacy-ledger.jsonl").noise_multipliers()
    assert spent == [z] * 3
    assert rdp_epsilon([*spent, noise_multiplier(fits, 1e-5)], 1e-5) <= ceiling
    assert rdp_epsilon([*spent, noise_multiplier(fits * 1.02, 1e-5)], 1e-5) > ceiling


def test_a_site_whose_budget_is_spent_is_told_only_a_higher_ceiling_lets_it_take_part(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "privacy-ledger.jsonl")
    for server_round in range(1, 30):
        ledger.record(1, server_round, noise_multiplier(8.0, 1e-5))
    with pytest.raises(FloorRefused, match="its budget is spent: only raising --max-epsilon"):
        admit_round(node_config(tmp_path, SiteFloor(max_epsilon=10)), ROUND, secagg=True, run_id=2)


def test_a_site_without_a_floor_takes_every_round_and_still_counts_the_dp_it_spends(tmp_path: Path) -> None:
    config = node_config(tmp_path, SiteFloor())
    admit_round(config, replace(ROUND, dp_epsilon=0.0), secagg=False, run_id=1)  # no DP: nothing to count
    assert not (tmp_path / "privacy-ledger.jsonl").exists()
    for server_round in (1, 2):
        admit_round(config, replace(ROUND, server_round=server_round), secagg=False, run_id=2)
    assert PrivacyLedger(tmp_path / "privacy-ledger.jsonl").noise_multipliers() == [noise_multiplier(4.0, 1e-5)] * 2


def test_a_damaged_ledger_stops_the_site_instead_of_reading_as_less_spent(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "privacy-ledger.jsonl")
    ledger.record(1, 1, 0.6)
    with ledger.path.open("a") as file:
        file.write("{truncated\n")
    with pytest.raises(ValueError, match=r"privacy-ledger.jsonl:2 is not a ledger entry"):
        admit_round(node_config(tmp_path, SiteFloor(max_epsilon=100)), ROUND, secagg=True, run_id=2)


def test_a_site_evaluates_only_for_a_run_whose_settings_meet_its_floor_and_spends_nothing_doing_so(
    tmp_path: Path
) -> None:
    config = node_config(tmp_path, SiteFloor(require_secagg=True, max_epsilon=1.0))
    with pytest.raises(FloorRefused, match="it requires SecAgg\\+"):
        admit_evaluation(config, replace(ROUND, secagg=False))
    with pytest.raises(FloorRefused, match="adds no differential-privacy noise"):
        admit_evaluation(config, replace(ROUND, secagg=True, dp_epsilon=0.0))
    admit_evaluation(config, replace(ROUND, secagg=True))  # epsilon 4 > 1, but an evaluation spends none
    assert not (tmp_path / "privacy-ledger.jsonl").exists()
