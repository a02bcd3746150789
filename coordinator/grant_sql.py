"""A lease grant's statements in plain SQL, on the connection of the scheduler's transaction.

Granting runs a dozen statements, 167 times a second at 10,000 workers. Built as ORM
expressions each cost about 250 us of Python (construction, cache key, ORM state) for
20 us of database work; as text they cost about 20 us. The grant's logic stays in
coordinator/scheduler.py, the tables in coordinator/store.py: these are its reads and
writes, in SQL that SQLite and PostgreSQL both run.
"""

from __future__ import annotations

from typing import NamedTuple

from sqlalchemy import Connection, text

from coordinator.leases import HELD_SQL

LAST_ROUND = text("SELECT max(number) FROM rounds")
WORKER = text("SELECT quarantined_at, backoff_until, failures, tokens_per_second, available_until, trust_class, "
              "peer_id FROM workers WHERE id = :worker")
SET_PEER_ID = text("UPDATE workers SET peer_id = :peer_id WHERE id = :worker")
HELD_BY_WORKER = text(f'SELECT count(id), coalesce(sum("end" - start), 0) FROM leases '
                      f"WHERE worker_id = :worker AND state IN ({HELD_SQL})")
ASSIGNED_TOKENS = text("SELECT name, assigned_tokens FROM sources")
_OLDEST_POOL_RANGE = ('SELECT id, shard_id, epoch, start, "end", source, shard_date FROM token_ranges '
                      "WHERE state = 'pool' AND source = :source ORDER BY epoch, shard_date, shard_id, start LIMIT 1")
OLDEST_POOL_RANGE = {"sqlite": text(_OLDEST_POOL_RANGE),  # one writer at a time: nothing to skip
                     "postgresql": text(_OLDEST_POOL_RANGE + " FOR UPDATE SKIP LOCKED")}  # another process's, skipped
ADD_POOL_RANGE = text('INSERT INTO token_ranges (shard_id, epoch, start, "end", state, source, shard_date) '
                      "VALUES (:shard_id, :epoch, :start, :end, 'pool', :source, :shard_date)")
LEASE_RANGE = text("UPDATE token_ranges SET \"end\" = :end, state = 'leased' WHERE id = :id")
COUNT_ASSIGNED = text("UPDATE sources SET assigned_tokens = assigned_tokens + :tokens WHERE name = :source")
EARLIER_ATTEMPTS = text("SELECT count(id) FROM leases WHERE shard_id = :shard_id AND epoch = :epoch AND start = :start")
INSERT_LEASE = text(
    'INSERT INTO leases (range_id, worker_id, shard_id, epoch, start, "end", round, attempt, state, deadline, '
    "granted_at, tokens_consumed) VALUES (:range_id, :worker_id, :shard_id, :epoch, :start, :end, :round, :attempt, "
    "'granted', :deadline, :granted_at, 0) RETURNING id")
ROUND_TOKENS = text(f'SELECT coalesce(sum("end" - start), 0) FROM leases WHERE worker_id = :worker '
                    f"AND round = :round AND state IN ({HELD_SQL}, 'completed')")


class PoolRange(NamedTuple):
    id: int
    shard_id: str
    epoch: int
    start: int
    end: int
    source: str
    shard_date: str


def oldest_pool_range(db: Connection, source: str) -> PoolRange | None:
    """The source's next range to lease, locked (PostgreSQL: ranges another transaction holds are skipped)."""
    row = db.execute(OLDEST_POOL_RANGE[db.dialect.name], {"source": source}).one_or_none()
    return PoolRange(*row) if row is not None else None


def lease_range(db: Connection, pool_range: PoolRange, end: int) -> None:
    """Lease the range up to `end`; its tail, if any, stays in the pool as a range of its own."""
    if end < pool_range.end:
        db.execute(ADD_POOL_RANGE, {"shard_id": pool_range.shard_id, "epoch": pool_range.epoch, "start": end,
                                    "end": pool_range.end, "source": pool_range.source,
                                    "shard_date": pool_range.shard_date})
    db.execute(LEASE_RANGE, {"id": pool_range.id, "end": end})
    db.execute(COUNT_ASSIGNED, {"tokens": end - pool_range.start, "source": pool_range.source})
