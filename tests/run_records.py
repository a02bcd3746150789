"""A small run's records, made by the real scheduler on the sample corpus, for the report and summary tests."""

from __future__ import annotations

import json
from pathlib import Path

from coordinator.scheduler import RoundReport, Scheduler
from coordinator.store import Evaluation, Worker, load_manifest, open_engine, session_factory
from model.shards import Manifest
from support import Clock

# Worker id -> (institution, trust class, declared grid intensity in gCO2e/kWh).
WORKERS = {"a": ("lab-a", "institution", 50.0), "b": ("independent", "volunteer", 0.0)}
LEASE_TOKENS = 1500
LANGUAGES = ("code", "en", "fr")


def record_run(database_url: str, corpus_dir: Path, rounds: int, evaluate: bool = True,
               joules_per_round: float = 9000.0) -> object:
    """`rounds` kept rounds of workers "a" and "b" (each a 1,500-token lease a round, every report kept);
    with `evaluate`, a held-out evaluation per language after each round. Returns the session factory."""
    sessions = session_factory(open_engine(database_url))
    load_manifest(sessions, Manifest.load(corpus_dir / "manifest.json"))
    with sessions.begin() as session:
        for worker_id, (institution, trust_class, grid) in WORKERS.items():
            session.add(Worker(id=worker_id, public_key=worker_id.encode() * 32, name=f"worker-{worker_id}",
                               institution=institution, device="cpu", registered_at=0.0, last_seen=0.0,
                               trust_class=trust_class, grid_gco2_per_kwh=grid))
    clock = Clock()
    scheduler = Scheduler(sessions, lease_seconds=600, total_rounds=rounds + 1, clock=clock)
    for number in range(rounds):
        leases = {worker_id: scheduler.acquire(worker_id, LEASE_TOKENS, number).lease for worker_id in WORKERS}
        for index, (worker_id, lease) in enumerate(leases.items()):
            clock.now += 10
            scheduler.complete_round(worker_id, RoundReport(
                round=number, leases=((lease.id, lease.end - lease.start),), loss=6.0 - number - 0.25 * index,
                pseudo_gradient_digest=f"{number}{worker_id}".ljust(64, "0"), params_digest=f"{number}".ljust(64, "p"),
                group_size=len(WORKERS), bytes_sent=100_000 * (number + 1), inner_seconds=6.0 + index,
                wall_seconds=10.0, energy_joules=joules_per_round * (index + 1), energy_method="estimate"))
        if evaluate:
            with sessions.begin() as session:
                session.add_all(Evaluation(round=number, params_digest=f"{number}".ljust(64, "p"), group="language",
                                           name=language, tokens=500, bytes=2000, loss=5.0 - number - 0.1 * i,
                                           bits_per_byte=3.0 - 0.5 * number - 0.1 * i, worker_id="a",
                                           created_at=clock.now)
                                for i, language in enumerate(LANGUAGES))
    return sessions


def write_checkpoint_json(directory: Path, corpus_dir: Path, completed_round: int, saved_at: float) -> Path:
    """A checkpoint's checkpoint.json (what the summary reads of a checkpoint; it never loads the weights)."""
    directory.mkdir(parents=True, exist_ok=True)
    root = Manifest.load(corpus_dir / "manifest.json").root_hash()
    (directory / "checkpoint.json").write_text(json.dumps({
        "completed_round": completed_round, "next_round": completed_round + 1, "run_id": "run-under-test",
        "lineage_head": 0, "params_digest": "f" * 64, "config_version": "genesis", "saved_at": saved_at,
        "run_config": {"corpus_root_hash": root, "model_preset": "tiny"},
    }))
    return directory
