"""Lease grants stay correct when many requests arrive at once, and on PostgreSQL across processes."""

import random
import threading
import time

from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from coordinator.accounting import accounting_problems
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
                lease = _retrying(lambda: _acquire_in_open_round(scheduler, f"w{index}", rng.randint(20, 90)))
                if rng.random() < 0.3:
                    _retrying(lambda: scheduler.release(f"w{index}", lease.id))
                else:
                    tokens = rng.randint(1, lease.end - lease.start)
                    report = RoundReport(round=lease.round, leases=((lease.id, tokens),), loss=1.0,
                                         pseudo_gradient_digest="d" * 64, params_digest="p" * 64, group_size=1)
                    while _retrying(lambda: scheduler.complete_round(f"w{index}", report)).pending:
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


def _retrying(call, attempts: int = 5):  # type: ignore[no-untyped-def]
    """PostgreSQL may abort one of two deadlocked transactions; a client retries it, as workers do."""
    for attempt in range(attempts):
        try:
            return call()
        except OperationalError:
            if attempt == attempts - 1:
                raise
