"""Registered workers that lie with their tensors or their data are caught, quarantined and credited nothing.

A live run (real coordinator, two honest workers, a certified validator) takes six
offenders at once: x100, sign_flip, random, nan, zero (a free-rider) and wrong_shard (trains
on another shard than its lease's). One at a time would take six runs' time; together they
are a harder case (six of eight peers lie), and each is still judged on its own replay.
Each reports an honest-looking claim where it can (worker/adversary.py). At the test's verify_fraction a new volunteer's
every report is checked until one passes (p = min(1, 0.1 x 2 x 5) = 1,
coordinator/verification.py), so each offender is caught on its first kept round with
enough witnesses (a group of two leaves one reducer's word, which decides nothing):
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
from coordinator.store import Check, FiledReport, LineageRecord, Round, Worker
from protocol.certificates import certify
from protocol.identity import Identity
from essaim.processes import kill_group, stop_group
from support import contributions_by_round, logs, start_role, start_worker, wait_all, wait_for
from worker.agent import QUARANTINED_EXIT

pytestmark = pytest.mark.e2e

RUN = dict(total_rounds=500, target_group_size=8, inner_steps=16, batch_size=4, seq_len=64, lease_seconds=10,
           heartbeat_seconds=1, matchmaking_seconds=4.0, averaging_timeout_seconds=15.0, verify_fraction=0.1,
           leases_per_round=1)
OFFENDERS = ("x100", "sign_flip", "random", "nan", "zero", "wrong_shard")
ROUNDS_AT_LEAST = 5  # long enough for each offender to be kept in a round or be seen straggling
YEAR = 365 * 86400


def quarantined(coordinator, name: str) -> bool:  # type: ignore[no-untyped-def]
    with coordinator.sessions()() as session:
        return session.scalar(select(Worker.quarantined_at).where(Worker.name == name)) is not None


def kept_rounds(coordinator, name: str) -> list[int]:  # type: ignore[no-untyped-def]
    with coordinator.sessions()() as session:
        return list(session.scalars(select(FiledReport.round).join(Worker, Worker.id == FiledReport.worker_id).where(
            Worker.name == name, FiledReport.outcome == "kept").order_by(FiledReport.round)))


def current_round(coordinator) -> int:  # type: ignore[no-untyped-def]
    with coordinator.sessions()() as session:
        last = session.scalar(select(func.max(Round.number)))
    return 0 if last is None else last + 1


def test_six_kinds_of_liars_are_each_caught_within_their_first_rounds_and_credited_nothing_after(
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
        # Every offender is caught, or was never in a kept round at all: on 2 cores one of eight peers may
        # straggle round after round (the others average without it), which keeps it out of the model.
        wait_for(lambda: all(quarantined(coordinator, kind) or not kept_rounds(coordinator, kind) for kind in OFFENDERS)
                 and current_round(coordinator) >= ROUNDS_AT_LEAST, 180, "every offender caught or kept out")
        stopped_at = current_round(coordinator)
        caught = {kind for kind in OFFENDERS if quarantined(coordinator, kind)}
        wait_all([offenders[kind] for kind in caught], timeout=60)  # each stops once refused a lease
        for kind in set(OFFENDERS) - caught:
            kill_group(offenders[kind])  # a straggler, still trying: it must not report on its way out
        for process in [*honest, validator]:
            stop_group(process)  # the run is long enough: SIGTERM, and they report what they trained and leave
    finally:
        for process in [*honest, *offenders.values(), validator]:
            kill_group(process)  # whatever is left of each process group, hivemind's children included
    names = ["h0", "h1", *offenders, "validator"]
    assert [w.returncode for w in honest] == [0, 0], logs(tmp_path, *names)
    assert {kind: p.returncode for kind, p in offenders.items() if kind in caught} == dict.fromkeys(
        caught, QUARANTINED_EXIT), logs(tmp_path, *names)  # a quarantined worker stops with its own code

    sessions = coordinator.sessions()
    by_round = contributions_by_round(sessions)
    assert sorted(by_round) == list(range(len(by_round)))
    for number, rows in by_round.items():
        assert len({c.params_digest for c in rows}) == 1, f"round {number}: {rows}"
    with sessions() as session:
        workers = {w.name: w for w in session.scalars(select(Worker))}
        for kind in set(OFFENDERS) - caught:  # a straggler: kept in no round, but perhaps the one it was killed in
            assert all(r >= stopped_at - 1 for r in kept_rounds(coordinator, kind)), (kind, logs(tmp_path, kind))
        for kind in caught:
            worker = workers[kind]
            kept = kept_rounds(coordinator, kind)
            # Checked every kept round until caught (one reducer's word alone leaves a check undecided), and
            # caught within its first three kept rounds, most often the first.
            assert worker.quarantine_round in kept[:3], (kind, kept, worker.quarantine_reason)
            # No check passes once it is caught. Before, one may: a liar's check holds the witnesses of the
            # reducers' kept reports only, and when every reducer that saw it send was itself a liar
            # quarantined first, nothing contradicts its honest claim.
            passed = session.scalars(select(Check).where(Check.worker_id == worker.id, Check.status == "passed")).all()
            assert all(c.round < worker.quarantine_round for c in passed), (kind, [(c.round, c.reason) for c in passed])
            after = session.scalars(select(LineageRecord).where(LineageRecord.worker_id == worker.id,
                                                                LineageRecord.created_at > worker.quarantined_at)).all()
            assert after == [], kind
        for name in ("h0", "h1"):
            assert workers[name].quarantined_at is None, (name, workers[name].quarantine_reason)
    assert accounting_problems(sessions) == []
    audit = subprocess.run([sys.executable, "-m", "essaim", "audit", "verify", "--data", str(corpus_dir),
                            "--database", coordinator.database_url], capture_output=True, text=True, timeout=120)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    for kind in caught:
        assert f"finding: worker {kind} (" in audit.stdout and "is quarantined: check" in audit.stdout, audit.stdout
    # Whoever straggled, each way of being caught was seen: by the witnesses, a NaN, and a false claim.
    with sessions() as session:
        reasons = " ".join(w.quarantine_reason for w in session.scalars(select(Worker)) if w.quarantine_reason)
    assert "reducers saw it send values" in reasons and "NaN or infinity" in reasons and "it claims" in reasons, reasons
