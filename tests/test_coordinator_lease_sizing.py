"""Leases sized to the worker: its speed, its allocation's end, its failures."""

import pytest

from coordinator.accounting import accounting_problems
from coordinator.lease_sizing import LeasePolicy, WorkerFacts, backoff_seconds, lease_size
from coordinator.round_terms import RoundTerms
from coordinator.scheduler import AllocationEnding, Backoff, RoundReport, Scheduler
from coordinator.store import Worker
from support import one_shard_store

POLICY = LeasePolicy(lease_tokens=4096, leases_per_round=4, round_seconds=10.0, min_tokens=64, drain_seconds=60.0)
NOW = 1_000_000.0


def test_a_slow_worker_gets_what_it_can_train_in_its_share_of_a_round() -> None:
    assert lease_size(POLICY, WorkerFacts(0.0, 0.0, 0), NOW) == 4096        # not measured yet: the run's size
    assert lease_size(POLICY, WorkerFacts(10_000.0, 0.0, 0), NOW) == 4096   # fast: the run's size
    assert lease_size(POLICY, WorkerFacts(800.0, 0.0, 0), NOW) == 2000      # 800 tokens/s x 10 s / 4 leases
    assert lease_size(POLICY, WorkerFacts(1.0, 0.0, 0), NOW) == 64          # at least one row


def test_a_lease_never_runs_past_the_allocation_and_none_is_given_at_its_end() -> None:
    assert lease_size(POLICY, WorkerFacts(1000.0, NOW + 60 + 2, 0), NOW) == 2000   # 2 s left before draining
    assert lease_size(POLICY, WorkerFacts(1000.0, NOW + 60 + 0.05, 0), NOW) is None  # 50 tokens: less than a row
    assert lease_size(POLICY, WorkerFacts(0.0, NOW + 30, 0), NOW) is None          # inside the drain period
    assert lease_size(POLICY, WorkerFacts(0.0, NOW + 3600, 0), NOW) == 4096


def test_failures_halve_leases_and_double_the_back_off() -> None:
    assert [lease_size(POLICY, WorkerFacts(0.0, 0.0, f), NOW) for f in range(4)] == [4096, 2048, 1024, 512]
    assert lease_size(POLICY, WorkerFacts(0.0, 0.0, 30), NOW) == 64
    assert [backoff_seconds(f) for f in (0, 1, 2, 3, 10)] == [0.0, 5.0, 10.0, 20.0, 300.0]


@pytest.fixture
def scheduler(database_url: str):
    clock = {"now": NOW}
    return Scheduler(one_shard_store(database_url), lease_seconds=30, total_rounds=100, clock=lambda: clock["now"],
                     terms=lambda _round: RoundTerms(POLICY)), clock


def test_a_worker_whose_leases_expire_waits_then_gets_smaller_leases_until_it_reports(scheduler) -> None:
    scheduler, clock = scheduler
    for failures, wait in ((1, 5.0), (2, 10.0)):
        scheduler.acquire("w", 10**9, 0)
        clock["now"] += 31
        with pytest.raises(Backoff, match=f"{failures} lease\\(s\\) in a row expired") as backoff:
            scheduler.acquire("w", 10**9, 0)
        assert backoff.value.retry_after == wait
        clock["now"] += wait
    lease = scheduler.acquire("w", 10**9, 0).lease
    assert lease.end - lease.start == 4096 // 4
    report = RoundReport(round=0, leases=((lease.id, 1024),), loss=1.0, pseudo_gradient_digest="d" * 64,
                         params_digest="p" * 64, group_size=1)
    scheduler.complete_round("w", report)
    # A reported round ends the streak: full leases again, once the expired ranges' pieces are used up.
    leases = [scheduler.acquire("w", 10**9, 1).lease for _ in range(3)]
    assert [(lease.start, lease.end) for lease in leases] == [(1024, 2048), (2048, 4096), (4096, 8192)]
    assert accounting_problems(scheduler._sessions) == []


def test_a_worker_at_the_end_of_its_allocation_gets_no_lease(scheduler) -> None:
    scheduler, _ = scheduler
    with scheduler._sessions.begin() as session:
        session.get(Worker, "w").available_until = NOW + 45
    with pytest.raises(AllocationEnding, match="allocation ends in 45 s"):
        scheduler.acquire("w", 10**9, 0)
