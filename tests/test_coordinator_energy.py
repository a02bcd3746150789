"""The energy a checkpoint cost, in its model card and its audit (coordinator/energy.py), from rounds really recorded."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from coordinator.audit import verify_run
from coordinator.card import build_card, card_markdown
from coordinator.rounds import Member
from coordinator.scheduler import LeaseLimits, RoundReport, Scheduler
from coordinator.store import Worker, load_manifest, open_engine, session_factory, sqlite_url
from model.checkpoints import Checkpoint
from model.shards import Manifest
from support import Clock

KWH = 3.6e6
# name: institution (as certified at Register), declared grid intensity (gCO2e/kWh; 0: none)
WORKERS = {"gpu": ("GENCI", 50.0), "cpu": ("independent", 0.0), "lost": ("independent", 300.0)}


def test_the_card_states_kwh_per_institution_and_round_what_was_measured_and_the_emissions(
    tmp_path: Path, corpus_dir: Path
) -> None:
    sessions = session_factory(open_engine(sqlite_url(tmp_path / "coordinator.db")))
    load_manifest(sessions, Manifest.load(corpus_dir / "manifest.json"))
    with sessions.begin() as session:
        session.add_all(Worker(id=name, public_key=name.encode().ljust(32, b"k"), name=name, institution=institution,
                               device="cpu", registered_at=0.0, last_seen=0.0, grid_gco2_per_kwh=intensity)
                        for name, (institution, intensity) in WORKERS.items())
    clock = Clock()
    scheduler = Scheduler(sessions, lease_seconds=30, total_rounds=5, clock=clock,
                          limits=LeaseLimits(min_tokens=10, max_leases=4, max_tokens=1000, max_seconds=300))
    spent = {"gpu": (3.6e6, "nvml"), "cpu": (1.8e6, "estimate")}  # joules a round: 1 kWh, 0.5 kWh
    tokens = lost_tokens = 0
    for round_number in range(2):
        leases = {w: scheduler.acquire(w, 200, round_number).lease for w in WORKERS}
        tokens += sum(lease.end - lease.start for lease in leases.values())
        lost = leases["lost"]  # its report is lost: the group vouches for it, with no energy figure
        lost_tokens += lost.end - lost.start
        for name, (joules, method) in spent.items():
            lease = leases[name]
            answer = scheduler.complete_round(name, RoundReport(
                round=round_number, leases=((lease.id, lease.end - lease.start),), loss=2.0,
                pseudo_gradient_digest="d" * 64, params_digest=f"{round_number:064d}", group_size=3,
                members=(Member("lost", ((lost.id, lost.end - lost.start),), 2.0),), energy_joules=joules,
                energy_method=method,
            ))
            assert answer.pending == (name == "gpu")  # the first report waits for the second
    assert scheduler.current_round() == 2

    root = Manifest.load(corpus_dir / "manifest.json").root_hash()
    checkpoint = Checkpoint(corpus_dir, completed_round=1, next_round=2, run_id="run", lineage_head=0,
                            params_digest="1" * 64, config_version="genesis", run_config={"corpus_root_hash": root},
                            saved_at=clock.now + 1)
    energy = build_card(sessions, checkpoint, corpus_dir)["energy"]
    assert energy["kwh"] == pytest.approx(3.0) and energy["rounds"] == 2 and energy["kwh_per_round"] == pytest.approx(1.5)
    assert energy["kwh_by_method"] == pytest.approx({"nvml": 2.0, "rapl": 0.0, "estimate": 1.0})
    assert (energy["measured_share"], energy["estimated_share"]) == pytest.approx((2 / 3, 1 / 3))
    assert energy["institutions"] == pytest.approx({"GENCI": 2.0}) and energy["volunteers_kwh"] == pytest.approx(1.0)
    # Only GENCI's worker declared an intensity (the vouched one did too, but has no energy figure).
    assert energy["emissions_kg_co2e"] == pytest.approx(2.0 * 50 / 1000)
    assert energy["undeclared_intensity_share"] == pytest.approx(1 / 3)
    assert (energy["tokens"], energy["tokens_without_energy"]) == (tokens, lost_tokens)

    earlier = build_card(sessions, dataclasses.replace(checkpoint, completed_round=0), corpus_dir)["energy"]
    assert earlier["kwh"] == pytest.approx(1.5) and earlier["rounds"] == 1  # a checkpoint holds only its rounds

    markdown = card_markdown(build_card(sessions, checkpoint, corpus_dir))
    assert "- Energy: 3.00 kWh over 2 rounds, 1.50 kWh per round on average" in markdown
    assert "- Measured: 67% (NVML 2.00 kWh, RAPL 0 kWh); estimated: 33% (1.00 kWh)" in markdown
    assert ("- Emissions estimate: 0.1 kg CO2e, from each worker's declared grid intensity; 33% of the energy ran "
            "where no intensity was declared and is not in this figure") in markdown
    assert "| GENCI | 2.00 | 66.7% |" in markdown and "| volunteers (no institution) | 1.00 | 33.3% |" in markdown
    assert verify_run(sessions, corpus_dir, []).energy_kwh == pytest.approx(3.0)
