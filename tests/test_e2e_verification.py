"""Registered workers that lie with their tensors or their data are caught, quarantined and credited nothing.

A live run (real coordinator, two honest workers, a certified validator) takes six
offenders at once: x100, sign_flip, random, nan, zero (a free-rider) and wrong_shard (trains
on another shard than its lease's). One at a time would take six runs' time; together they
are a harder case (six of eight peers lie), and each is still judged on its own replay. Each reports an honest-looking
claim where it can (worker/adversary.py). At the test's verify_fraction a new volunteer's
every report is checked until one passes (p = min(1, 0.1 x 2 x 5) = 1,
coordinator/verification.py), so each offender is caught on its first kept round:
quarantined (it exits with its own code), named by `essaim audit verify`, and credited no
token after the verdict. The honest workers finish every round on one model, and the
accounting invariant holds.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select

from coordinator.accounting import accounting_problems
from coordinator.store import FiledReport, LineageRecord, Round, Worker
from protocol.certificates import certify
from protocol.identity import Identity
from essaim.processes import kill_group, stop_group
from support import contributions_by_round, logs, start_role, start_worker, wait_all, wait_for
from worker.agent import QUARANTINED_EXIT

pytestmark = pytest.mark.e2e

RUN = dict(total_rounds=500, target_group_size=8, inner_steps=24, batch_size=4, seq_len=64, lease_seconds=10,
           heartbeat_seconds=1, matchmaking_seconds=4.0, averaging_timeout_seconds=15.0, verify_fraction=0.1,
           leases_per_round=1)
OFFENDERS = ("x100", "sign_flip", "random", "nan", "zero", "wrong_shard")
YEAR = 365 * 86400


def quarantined(coordinator, name: str) -> bool:  # type: ignore[no-untyped-def]
    with coordinator.sessions()() as session:
        return session.scalar(select(Worker.quarantined_at).where(Worker.name == name)) is not None


def current_round(coordinator) -> int:  # type: ignore[no-untyped-def]
    with coordinator.sessions()() as session:
        last = session.scalar(select(func.max(Round.number)))
    return 0 if last is None else last + 1


def test_six_kinds_of_liars_are_each_caught_on_their_first_round_and_credited_nothing_after(
        start_coordinator, corpus_dir: Path, tmp_path: Path) -> None:
    genci = Ed25519PrivateKey.generate()
    key_hex = certify("x", genci, b"\0" * 32, "institution", 0).institution_key
    coordinator = start_coordinator(extra=(f"--admit-institution=GENCI={key_hex}",), **RUN)
    identity = Identity.load_or_create(tmp_path / "validator.key")
    (tmp_path / "validator.cert").write_bytes(
        certify("GENCI", genci, identity.public_key, "institution", int(time.time() + YEAR)).to_bytes())
    validator = start_role(["validator", "join", "--coordinator", coordinator.address, "--identity",
                            str(tmp_path / "validator.key"), "--certificate", str(tmp_path / "validator.cert"),
                            "--institution", "GENCI"], tmp_path / "validator.log", env={"OMP_NUM_THREADS": "1"})
    honest = [start_worker(coordinator, tmp_path, f"h{i}") for i in range(2)]
    offenders: dict[str, subprocess.Popen[bytes]] = {}
    try:
        offenders.update({kind: start_worker(coordinator, tmp_path, kind, "--adversary", kind) for kind in OFFENDERS})
        wait_for(lambda: all(quarantined(coordinator, kind) for kind in OFFENDERS), 180, "every offender quarantined")
        wait_all(list(offenders.values()), timeout=60)  # each stops once refused a lease
        last = current_round(coordinator)
        wait_for(lambda: current_round(coordinator) >= last + 2, 60, "two more rounds of the honest workers alone")
        for process in [*honest, validator]:
            stop_group(process)  # the run is long enough: SIGTERM, and they report what they trained and leave
    finally:
        for process in [*honest, *offenders.values(), validator]:
            kill_group(process)  # whatever is left of each process group, hivemind's children included
    names = ["h0", "h1", *offenders, "validator"]
    assert [w.returncode for w in honest] == [0, 0], logs(tmp_path, *names)
    assert {kind: p.returncode for kind, p in offenders.items()} == dict.fromkeys(offenders, QUARANTINED_EXIT), \
        logs(tmp_path, *names)

    sessions = coordinator.sessions()
    by_round = contributions_by_round(sessions)
    assert sorted(by_round) == list(range(len(by_round)))
    for number, rows in by_round.items():
        assert len({c.params_digest for c in rows}) == 1, f"round {number}: {rows}"
    with sessions() as session:
        workers = {w.name: w for w in session.scalars(select(Worker))}
        for kind in offenders:
            worker = workers[kind]
            assert worker.quarantined_at is not None, (kind, logs(tmp_path, kind, "validator"))
            first_kept = session.scalar(select(func.min(FiledReport.round)).where(
                FiledReport.worker_id == worker.id, FiledReport.outcome == "kept"))
            assert worker.quarantine_round == first_kept, (kind, worker.quarantine_reason)  # its first kept round
            after = session.scalars(select(LineageRecord).where(LineageRecord.worker_id == worker.id,
                                                                LineageRecord.created_at > worker.quarantined_at)).all()
            assert after == [], kind
        for name in ("h0", "h1"):
            assert workers[name].quarantined_at is None, (name, workers[name].quarantine_reason)
    assert accounting_problems(sessions) == []
    audit = subprocess.run([sys.executable, "-m", "essaim", "audit", "verify", "--data", str(corpus_dir),
                            "--database", coordinator.database_url], capture_output=True, text=True, timeout=120)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    for kind in offenders:
        assert f"finding: worker {kind} (" in audit.stdout and "is quarantined: check" in audit.stdout, audit.stdout
