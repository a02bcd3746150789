"""Leases, rounds and the accounting invariant, on a real SQLite store."""

import dataclasses

import pytest
from sqlalchemy import select

from coordinator.accounting import accounting_problems
from coordinator.rewind import RewindRefused, rewind
from coordinator.scheduler import LeaseError, RoundReport, Scheduler
from coordinator.store import (
    Contribution, Lease, LineageRecord, TokenRange, Worker, load_manifest, open_engine, session_factory,
)
from model.shards import Manifest, ShardInfo, SourceInfo
from support import Clock


def shard(shard_id: str, tokens: int, language: str = "fr", date: str = "2020-01-01") -> ShardInfo:
    return ShardInfo(
        shard_id, f"{shard_id}.bin", "0" * 64, tokens, "uint16", language, f"{shard_id[0]}-src", "CC0-1.0", date, date
    )


def source(name: str, weight: float = 1.0, language: str = "fr") -> SourceInfo:
    return SourceInfo(name, language, "CC0-1.0", weight, "2000-01-01", "2030-12-31")


@pytest.fixture
def store(database_url: str):
    """Two sources of equal weight: a-src (shard a, 100 tokens) and b-src (shard b, 50 tokens)."""
    sessions = session_factory(open_engine(database_url))
    load_manifest(sessions, Manifest(1000, "t" * 64, [source("a-src"), source("b-src", language="en")],
                                     [shard("a", 100), shard("b", 50, "en")]))
    with sessions.begin() as session:
        for name in ("w1", "w2"):
            session.add(Worker(id=name, public_key=b"k" * 32, name=name, institution=f"inst-{name}",
                               device="cpu", registered_at=0.0, last_seen=0.0))
    return sessions


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def scheduler(store, clock: Clock) -> Scheduler:
    return Scheduler(store, lease_seconds=30, total_rounds=5, clock=clock)


def done(lease_id: int, tokens: int, round_number: int = 0) -> RoundReport:
    """A round trained on one lease."""
    return report((lease_id, tokens), round_number=round_number)


def report(*leases: tuple[int, int], round_number: int = 0) -> RoundReport:
    return RoundReport(
        round=round_number, leases=leases, loss=2.0, pseudo_gradient_digest="d" * 64, params_digest="p" * 64,
        group_size=2, bytes_sent=1000, inner_seconds=9.0, wall_seconds=10.0,
    )


def test_leases_alternate_sources_of_equal_weight_and_repeat_the_smaller(scheduler: Scheduler, store) -> None:
    leases = [scheduler.acquire(worker, 40, 0).lease for worker in ("w1", "w2", "w1", "w2", "w1", "w2")]
    assert [(lease.shard_id, lease.epoch, lease.start, lease.end) for lease in leases] == [
        ("a", 0, 0, 40), ("b", 0, 0, 40), ("a", 0, 40, 80), ("b", 0, 40, 50), ("b", 1, 0, 40), ("a", 0, 80, 100)
    ]
    assert accounting_problems(store) == []


def test_when_every_range_is_out_on_lease_the_next_epoch_opens(scheduler: Scheduler, store) -> None:
    straggler = scheduler.acquire("w1", 1000, 0).lease
    scheduler.acquire("w2", 1000, 0)
    following = scheduler.acquire("w2", 1000, 0).lease  # no worker idles waiting for the straggler
    assert (following.epoch, following.shard_id, following.start) == (1, "b", 0)  # b-src is behind its share
    scheduler.release("w1", straggler.id)
    assert (scheduler.acquire("w2", 1000, 0).lease.epoch, straggler.epoch) == (0, 0)  # older epoch first
    assert accounting_problems(store) == []


def test_completing_part_of_a_lease_returns_the_rest_to_the_pool(scheduler: Scheduler, store) -> None:
    lease = scheduler.acquire("w1", 60, 0).lease
    [lineage_id] = scheduler.complete_round("w1", done(lease.id, 25)).lineage_ids
    with store() as session:
        record = session.get(LineageRecord, lineage_id)
        assert (record.shard_id, record.start, record.end, record.institution) == ("a", 0, 25, "inst-w1")
    other_shard = scheduler.acquire("w2", 1000, 1).lease
    follow_up = scheduler.acquire("w2", 1000, 1).lease
    assert (other_shard.shard_id, other_shard.start) == ("b", 0)
    assert (follow_up.shard_id, follow_up.start, follow_up.end) == ("a", 25, 60)
    assert accounting_problems(store) == []


def test_an_expired_lease_goes_back_to_the_pool_and_is_reissued(scheduler: Scheduler, store, clock: Clock) -> None:
    lease = scheduler.acquire("w1", 30, 0).lease
    clock.now += 31
    assert scheduler.expire_overdue() == 1
    again = scheduler.acquire("w2", 30, 0).lease
    assert (again.start, again.end, again.attempt) == (lease.start, lease.end, 2)
    with pytest.raises(LeaseError, match="expired"):
        scheduler.complete_round("w1", done(lease.id, 30))
    assert accounting_problems(store) == []


def test_heartbeats_keep_a_lease_alive(scheduler: Scheduler, clock: Clock) -> None:
    lease = scheduler.acquire("w1", 30, 0).lease
    for _ in range(4):
        clock.now += 20
        scheduler.heartbeat("w1", 0, 2.0, 100.0)
    assert scheduler.expire_overdue() == 0
    scheduler.complete_round("w1", done(lease.id, 30))


def test_released_lease_is_reissued_whole(scheduler: Scheduler, store) -> None:
    lease = scheduler.acquire("w1", 30, 0).lease
    scheduler.release("w1", lease.id)
    again = scheduler.acquire("w2", 30, 0).lease
    assert (again.start, again.end) == (0, 30)
    assert accounting_problems(store) == []


def test_refused_completions_change_nothing(scheduler: Scheduler, store) -> None:
    lease = scheduler.acquire("w1", 30, 0).lease
    with store() as session:
        before = [(r.start, r.end, r.state) for r in session.scalars(select(TokenRange).order_by(TokenRange.id))]
    with pytest.raises(LeaseError, match="another worker"):
        scheduler.complete_round("w2", done(lease.id, 30))
    with pytest.raises(LeaseError, match="tokens_consumed must be in 1..30"):
        scheduler.complete_round("w1", done(lease.id, 31))
    with pytest.raises(LeaseError, match="no lease 999"):
        scheduler.complete_round("w1", done(999, 1))
    with store() as session:
        after = [(r.start, r.end, r.state) for r in session.scalars(select(TokenRange).order_by(TokenRange.id))]
        assert session.scalars(select(LineageRecord)).all() == []
        assert session.get(Lease, lease.id).state == "granted"
    assert after == before


def test_a_round_on_several_leases_is_recorded_once_with_its_costs(scheduler: Scheduler, store) -> None:
    first, second = scheduler.acquire("w1", 40, 0).lease, scheduler.acquire("w1", 40, 0).lease
    recorded = scheduler.complete_round("w1", report((first.id, 40), (second.id, 15)))
    assert len(recorded.lineage_ids) == 2 and recorded.lineage_head == max(recorded.lineage_ids)
    with store() as session:
        [contribution] = session.scalars(select(Contribution)).all()
        assert (contribution.round, contribution.tokens, contribution.bytes_sent) == (0, 55, 1000)
    assert scheduler.current_round() == 1
    assert accounting_problems(store) == []


def test_a_report_with_other_parameters_than_the_kept_ones_is_not_recorded(scheduler: Scheduler, store) -> None:
    first, second = scheduler.acquire("w1", 40, 0).lease, scheduler.acquire("w2", 40, 0).lease
    assert scheduler.complete_round("w1", report((first.id, 40))).pending  # w2's 40 tokens could still tie
    diverged = dataclasses.replace(report((second.id, 40)), params_digest="q" * 64)
    recorded = scheduler.complete_round("w2", diverged)  # a tie with nothing out: the smaller digest, "p..."
    assert (recorded.accepted, recorded.round_params_digest, recorded.lineage_ids) == (False, "p" * 64, [])
    assert scheduler.complete_round("w1", report((first.id, 40))).accepted  # sent again: decided now
    with store() as session:
        assert session.get(Lease, second.id).state == "released"  # its tokens are back in the pool
        assert len(session.scalars(select(Contribution)).all()) == 1
    assert accounting_problems(store) == []


def test_a_round_report_with_one_bad_lease_records_nothing(scheduler: Scheduler, store) -> None:
    good, stolen = scheduler.acquire("w1", 40, 0).lease, scheduler.acquire("w2", 40, 0).lease
    with pytest.raises(LeaseError, match="another worker"):
        scheduler.complete_round("w1", report((good.id, 40), (stolen.id, 40)))
    with pytest.raises(LeaseError, match="repeat"):
        scheduler.complete_round("w1", report((good.id, 20), (good.id, 20)))
    with pytest.raises(LeaseError, match="at least one lease"):
        scheduler.complete_round("w1", report())
    with store() as session:
        assert session.scalars(select(LineageRecord)).all() == []
        assert session.scalars(select(Contribution)).all() == []
        assert session.get(Lease, good.id).state == "granted"
    assert accounting_problems(store) == []


def test_a_fully_trained_epoch_opens_the_next(scheduler: Scheduler, store) -> None:
    for round_number in range(2):
        lease = scheduler.acquire("w1", 1000, round_number).lease
        scheduler.complete_round("w1", done(lease.id, lease.end - lease.start, round_number))
    nxt = scheduler.acquire("w1", 1000, 2).lease
    assert (nxt.epoch, nxt.shard_id, nxt.start) == (1, "b", 0)
    assert accounting_problems(store) == []


def test_rounds_advance_with_reports(scheduler: Scheduler) -> None:
    assert scheduler.current_round() == 0
    lease = scheduler.acquire("w1", 10, 0).lease
    scheduler.complete_round("w1", done(lease.id, 10, round_number=0))
    assert scheduler.current_round() == 1
    assert not scheduler.run_complete(4) and scheduler.run_complete(5)


def test_a_worker_that_missed_the_last_round_is_told_the_run_is_complete(scheduler: Scheduler) -> None:
    for round_number in range(5):  # the fixture's run has 5 rounds
        assert not scheduler.run_complete(3)  # behind, but the swarm may still be caught up with
        lease = scheduler.acquire("w1", 10, round_number).lease
        scheduler.complete_round("w1", done(lease.id, 10, round_number=round_number))
    assert scheduler.run_complete(3)  # the last round is recorded: nothing is left to catch up to


def test_accounting_detects_a_lost_range(scheduler: Scheduler, store) -> None:
    scheduler.acquire("w1", 30, 0)
    with store.begin() as session:
        session.delete(session.scalars(select(TokenRange).where(TokenRange.state == "pool", TokenRange.shard_id == "a")).one())
    assert accounting_problems(store) == [
        "shard a epoch 0: tokens 30..100 are in no range (neither in the pool, on lease nor trained): lost"
    ]
    with store.begin() as session:  # a shard whose only range disappears leaves no row to check: still caught
        session.delete(session.scalars(select(TokenRange).where(TokenRange.shard_id == "b")).one())
    assert "shard b epoch 0: tokens 0..50 are in no range (neither in the pool, on lease nor trained): lost" in (
        accounting_problems(store)
    )


def test_a_second_corpus_is_refused_by_the_same_database(store) -> None:
    with pytest.raises(ValueError, match="fresh database"):
        load_manifest(store, Manifest(1000, "t" * 64, [source("c-src")], [shard("c", 10)]))


def test_a_rewind_returns_later_rounds_tokens_to_the_pool_once(scheduler: Scheduler, store, clock: Clock) -> None:
    for round_number in range(3):
        lease = scheduler.acquire("w1", 30, round_number).lease
        scheduler.complete_round("w1", done(lease.id, 30, round_number=round_number))
    live = scheduler.acquire("w2", 30, 3).lease
    with pytest.raises(RewindRefused, match="1 lease"):
        rewind(store, to_round=1, now=clock.now)
    clock.now += 31  # the live lease's deadline passes: the coordinator is down
    rewound = rewind(store, to_round=1, now=clock.now)
    assert (rewound.rounds, rewound.leases, rewound.tokens) == (2, 2, 60)
    assert scheduler.current_round() == 1
    assert accounting_problems(store) == []
    with store() as session:
        kept = session.scalars(select(LineageRecord).where(LineageRecord.rewound_at.is_(None))).all()
        assert [(r.round, r.start, r.end) for r in kept] == [(0, 0, 30)]
    # The rewound ranges (rounds 1 and 2) and the expired one are leased again.
    again = [scheduler.acquire("w1", 30, 1).lease for _ in range(3)]
    assert sorted((lease.shard_id, lease.start) for lease in again) == [("a", 30), ("b", 0), (live.shard_id, live.start)]
    assert accounting_problems(store) == []


def test_a_report_retried_after_a_lost_reply_gets_the_same_answer(scheduler: Scheduler, store) -> None:
    first, second = (scheduler.acquire("w1", 30, 0).lease for _ in range(2))
    original = scheduler.complete_round("w1", report((first.id, 30), (second.id, 12)))
    again = scheduler.complete_round("w1", report((first.id, 30), (second.id, 12)))
    assert again == original and again.accepted
    with pytest.raises(LeaseError, match="already reported with other leases or token counts"):
        scheduler.complete_round("w1", report((first.id, 30), (second.id, 11)))
    with store() as session:
        assert len(session.scalars(select(Contribution)).all()) == 1
    assert accounting_problems(store) == []


def test_a_restarted_coordinator_gives_leases_out_a_grace_instead_of_expiring_them(
    scheduler: Scheduler, clock: Clock
) -> None:
    lease = scheduler.acquire("w1", 30, 0).lease
    clock.now += 31  # the coordinator was down past the deadline: nobody could heartbeat
    assert scheduler.extend_leases_after_restart() == 1
    assert scheduler.expire_overdue() == 0
    assert scheduler.complete_round("w1", done(lease.id, 30)).accepted
