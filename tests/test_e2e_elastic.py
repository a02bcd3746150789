"""Elastic membership with real processes: a worker dies mid-round, another joins late.

Rounds here are bounded by time (round_seconds), as on a mixed swarm, and the
pseudo-gradients travel 8-bit with error feedback. After every scenario the peers
that averaged together hold identical parameters and the token accounting holds.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from coordinator.accounting import accounting_problems
from coordinator.store import FiledReport, Lease, Worker
from essaim.processes import group_alive, kill_group
from support import contributions_by_round, logs, start_worker, wait_all, wait_for

pytestmark = pytest.mark.e2e

TIMED_ROUNDS = dict(
    target_group_size=3, round_seconds=3.0, inner_steps=100_000, batch_size=4, seq_len=64, inner_lr=0.003,
    matchmaking_seconds=2.0, averaging_timeout_seconds=15.0, lease_seconds=5, heartbeat_seconds=1,
    compression="8bit", error_feedback=True,
)


def full_round(sessions, size: int) -> int | None:  # type: ignore[no-untyped-def]
    """The newest round that `size` workers averaged together, if any."""
    full = [r for r, rows in contributions_by_round(sessions).items()
            if len(rows) == size and all(c.group_size == size for c in rows)]
    return max(full) if full else None


def assert_groups_agree(sessions) -> None:  # type: ignore[no-untyped-def]
    for number, rows in contributions_by_round(sessions).items():
        assert len({c.params_digest for c in rows}) == 1, f"round {number}: parameters differ between workers"


def run_with_a_late_joiner(coordinator, tmp_path: Path, names: list[str]) -> str:  # type: ignore[no-untyped-def]
    """Two workers start the run; a third (the last name) joins once they averaged a round. Its worker id."""
    sessions = coordinator.sessions()
    workers = [start_worker(coordinator, tmp_path, name) for name in names[:2]]
    try:
        wait_for(lambda: full_round(sessions, 2), 120, "a round averaged by the first two workers")
        workers.append(start_worker(coordinator, tmp_path, names[2]))
        wait_all(workers, timeout=180)
    finally:
        for worker in workers:
            kill_group(worker)
    assert [w.returncode for w in workers] == [0, 0, 0], logs(tmp_path, *names)
    with sessions() as session:
        return session.scalars(select(Worker.id).where(Worker.name == names[2])).one()


def test_a_worker_killed_mid_round_is_dropped_and_the_others_finish_the_round(start_coordinator, tmp_path: Path):
    coordinator = start_coordinator(total_rounds=7, **TIMED_ROUNDS)
    sessions = coordinator.sessions()
    names = ["steady-0", "steady-1", "doomed"]
    workers = [start_worker(coordinator, tmp_path, name) for name in names]
    try:
        together = wait_for(lambda: full_round(sessions, 3), 120, "a round averaged by all three workers")
        time.sleep(1.0)  # into the next round's inner steps
        kill_group(workers[2])
        assert not group_alive(workers[2].pid)
        wait_all(workers[:2], timeout=120)
    finally:
        for worker in workers:
            kill_group(worker)
    assert [w.returncode for w in workers[:2]] == [0, 0], logs(tmp_path, *names)

    by_round = contributions_by_round(sessions)
    interrupted = by_round[together + 1]
    assert len(interrupted) == 2 and {c.group_size for c in interrupted} == {2}, logs(tmp_path, *names)
    assert sorted(by_round) == list(range(7))
    assert_groups_agree(sessions)
    with sessions() as session:  # the dead worker's lease came back to the pool, and its tokens were trained
        doomed_states = {lease.state for lease in session.scalars(select(Lease).where(Lease.state != "completed"))}
    assert "expired" in doomed_states or "released" in doomed_states
    assert accounting_problems(sessions) == []


def test_a_late_joiner_ends_its_first_round_with_the_swarms_parameters(start_coordinator, tmp_path: Path):
    coordinator = start_coordinator(total_rounds=8, **TIMED_ROUNDS)
    sessions = coordinator.sessions()
    names = ["early-0", "early-1", "late"]
    late_id = run_with_a_late_joiner(coordinator, tmp_path, names)

    by_round = contributions_by_round(sessions)
    first = min(r for r, rows in by_round.items() if any(c.worker_id == late_id for c in rows))
    assert first > 0
    assert len(by_round[first]) == 3 and {c.group_size for c in by_round[first]} == {3}, logs(tmp_path, *names)
    assert len({c.params_digest for c in by_round[first]}) == 1, "the late joiner's parameters differ from the swarm's"
    assert_groups_agree(sessions)
    assert accounting_problems(sessions) == []


def test_overlapped_rounds_train_while_the_last_one_averages_and_a_late_joiner_fits_in(
        start_coordinator, tmp_path: Path):
    coordinator = start_coordinator(total_rounds=7, overlap_averaging=True, verify_fraction=0.0, **TIMED_ROUNDS)
    sessions = coordinator.sessions()
    names = ["early-0", "early-1", "late"]
    late_id = run_with_a_late_joiner(coordinator, tmp_path, names)

    by_round = contributions_by_round(sessions)
    assert sorted(by_round) == list(range(7))
    assert_groups_agree(sessions)  # one model per round: the delayed outer steps are the same on every peer
    averaged = [r for r, rows in by_round.items() if len(rows) >= 2 and min(c.group_size for c in rows) >= 2]
    assert len(averaged) >= 5, (by_round, logs(tmp_path, *names))  # groups meet while the next round trains
    with sessions() as session:  # overlapped: a round's leases were granted before the round before it was reported.
        first_grant = dict(session.execute(select(Lease.round, func.min(Lease.granted_at)).group_by(Lease.round)).all())
        first_report = dict(session.execute(select(FiledReport.round, func.min(FiledReport.received_at))
                                            .group_by(FiledReport.round)).all())
    ahead = [r for r in range(1, 7) if first_grant[r] < first_report[r - 1]]
    assert len(ahead) >= 4, (first_grant, first_report, logs(tmp_path, *names))
    joined = [r for r, rows in by_round.items() if any(c.worker_id == late_id for c in rows)]
    assert joined and all(len(by_round[r]) == 3 for r in joined), logs(tmp_path, *names)
    assert accounting_problems(sessions) == []
