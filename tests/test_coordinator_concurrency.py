"""Lease grants stay correct when many requests arrive at once, and on PostgreSQL across processes."""

import random
import threading
import time

from sqlalchemy import select

from coordinator.accounting import accounting_problems
from coordinator.conflicts import retry_conflicts
from coordinator.report_sql import take_decision
from coordinator.scheduler import RoundOver, RoundReport, Scheduler
from coordinator.store import LineageRecord, Worker, load_manifest, open_engine, session_factory
from model.shards import Manifest, ShardInfo, SourceInfo

THREADS, REQUESTS = 6, 40


def test_concurrent_grants_never_lease_a_token_twice(database_url: str) -> None:
    sources = [SourceInfo(f"s{i}", "fr", "CC0-1.0", 1.0 + i, "2020-01-01", "2020-12-31") for i in range(3)]
    shards = [ShardInfo(f"s{i}-{j}", f"s{i}-{j}.bin", "0" * 64, 700, "uint16", "fr", f"s{i}", "CC0-1.0",
                        "2020-01-01", "2020-12-31") for i in range(3) for j in range(2)]
    sessions = session_factory(open_engine(database_url))
    load_manifest(sessions, Manifest(1000, "t" * 64, sources, shards))
    with sessions.begin() as session:
        session.add_all(Worker(id=f"w{i}", public_key=b"k" * 32, name=f"w{i}", institution="lab", device="cpu",
                               registered_at=0.0, last_seen=0.0) for i in range(THREADS))
    # On PostgreSQL each thread gets its own scheduler, as separate coordinator processes would:
    # only row locks keep them apart. SQLite has one writer, so one process with its lock.
    shared = Scheduler(sessions, lease_seconds=60, total_rounds=1000)
    postgres = sessions.kw["bind"].dialect.name == "postgresql"
    failures: list[BaseException] = []

    def worker(index: int) -> None:
        scheduler = Scheduler(sessions, lease_seconds=60, total_rounds=1000) if postgres else shared
        rng = random.Random(index)
        try:
            for _ in range(REQUESTS):
                # On PostgreSQL two schedulers' transactions deadlock now and then: the scheduler runs the
                # aborted one again itself (coordinator/conflicts.py), so no call here fails for it.
                lease = _acquire_in_open_round(scheduler, f"w{index}", rng.randint(20, 90))
                if rng.random() < 0.3:
                    scheduler.release(f"w{index}", lease.id)
                else:
                    tokens = rng.randint(1, lease.end - lease.start)
                    report = RoundReport(round=lease.round, leases=((lease.id, tokens),), loss=1.0,
                                         pseudo_gradient_digest="d" * 64, params_digest="p" * 64, group_size=1)
                    while scheduler.complete_round(f"w{index}", report).pending:
                        time.sleep(0.005)  # until the others' leases of the round are in, as a worker polls
        except BaseException as error:  # surfaced below, with the thread's name
            failures.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert failures == []
    assert accounting_problems(sessions) == []
    with sessions() as session:
        records = session.scalars(select(LineageRecord)).all()
    assert len(records) > THREADS * REQUESTS // 2
    covered: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for record in records:
        covered.setdefault((record.shard_id, record.epoch), []).append((record.start, record.end))
    for spans in covered.values():
        spans.sort()
        assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:])), spans


def _acquire_in_open_round(scheduler: Scheduler, worker_id: str, tokens: int):  # type: ignore[no-untyped-def]
    while True:
        try:
            return scheduler.acquire(worker_id, tokens, scheduler.current_round()).lease
        except RoundOver:  # decided between the two calls: ask in the next one
            continue



def test_a_transaction_postgresql_aborts_for_a_deadlock_runs_again(postgres) -> None:
    sessions = session_factory(open_engine(postgres.create_database()))
    with sessions.begin() as session:
        session.add_all(Worker(id=name, public_key=b"k" * 32, name=name, institution="lab", device="cpu",
                               registered_at=0.0, last_seen=0.0) for name in ("a", "b"))
    both_hold_one = threading.Barrier(2)
    attempts = {"a": 0, "b": 0}

    def lock_in_order(first: str, second: str) -> None:
        def attempt() -> None:
            attempts[first] += 1
            with sessions.begin() as session:
                session.get(Worker, first, with_for_update=True)
                if attempts[first] == 1:
                    both_hold_one.wait(timeout=10)  # each waits for the other's row next: a deadlock
                session.get(Worker, second, with_for_update=True).failures += 1

        retry_conflicts(attempt)

    threads = [threading.Thread(target=lock_in_order, args=order) for order in (("a", "b"), ("b", "a"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(attempts.values()) == [1, 2]  # PostgreSQL aborted one of the two; it ran again
    with sessions() as session:
        assert [worker.failures for worker in session.scalars(select(Worker).order_by(Worker.id))] == [1, 1]


def test_one_transaction_at_a_time_decides_a_round_and_the_others_do_not_wait(postgres) -> None:
    sessions = session_factory(open_engine(postgres.create_database()))
    with sessions.begin() as deciding, sessions.begin() as reporting:
        assert take_decision(deciding.connection(), 5)
        assert not take_decision(reporting.connection(), 5)  # answered at once: its report stays pending
        assert take_decision(reporting.connection(), 6)  # another round's decision is free
    with sessions.begin() as later:
        assert take_decision(later.connection(), 5)  # the lock ended with its transaction
