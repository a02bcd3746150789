"""Leases, rounds and lineage: the coordinator's decisions, on top of the store.

A lock serialises one process's decisions (all SQLite needs). On PostgreSQL, rows
are locked as they are decided on (SELECT ... FOR UPDATE, SKIP LOCKED for pool
ranges and overdue leases), so several coordinator processes can share a database
without two of them granting the same tokens.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, sessionmaker

from coordinator.heartbeats import HeartbeatBuffer
from coordinator.lease_sizing import WorkerFacts, backoff_seconds, lease_size
from coordinator.mixture import mixture_order
from coordinator.round_terms import RoundTerms
from coordinator.store import (
    Contribution, Lease, LineageRecord, Round, Shard, Source, TokenRange, Worker, count_assigned,
)


class LeaseError(Exception):
    """A lease request that cannot be honoured; the message says why and what to do."""


class Backoff(LeaseError):
    """The worker's leases kept expiring: no new lease before ``retry_after`` seconds."""

    def __init__(self, retry_after: float, failures: int) -> None:
        super().__init__(f"{failures} lease(s) in a row expired: ask again in {retry_after:.0f} s")
        self.retry_after = retry_after


class AllocationEnding(LeaseError):
    """Too little of the worker's allocation is left to train a lease."""


@dataclass(frozen=True)
class LeaseGrant:
    lease: Lease
    shard: Shard


@dataclass(frozen=True)
class RoundReport:
    """A worker's finished round: the leases it trained on and how averaging went."""

    round: int
    leases: tuple[tuple[int, int], ...]  # (lease id, tokens consumed: a prefix of the lease's range)
    loss: float
    pseudo_gradient_digest: str
    params_digest: str
    group_size: int
    bytes_sent: int = 0
    inner_seconds: float = 0.0
    wall_seconds: float = 0.0


@dataclass(frozen=True)
class RoundRecorded:
    accepted: bool           # False: the round already has other parameters; nothing was recorded
    round_params_digest: str  # the parameters every accepted report of this round agrees on
    lineage_ids: list[int]   # one per lease, in report order
    lineage_head: int        # the newest lineage record id


class Scheduler:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        lease_seconds: float,
        total_rounds: int,
        clock: Callable[[], float] = time.time,
        terms: Callable[[int], RoundTerms] = lambda _round: RoundTerms(),
    ) -> None:
        self._sessions = sessions
        self.lease_seconds = lease_seconds
        self.total_rounds = total_rounds
        self._terms = terms  # lease policy, mixture and config version in force at a round
        self._heartbeats = HeartbeatBuffer()
        self._expired_at = -math.inf
        self._weights_cache: tuple[float, dict[str, float]] = (-math.inf, {})
        self._clock = clock
        self._lock = threading.Lock()

    # -- leases --------------------------------------------------------------------------

    def acquire(self, worker_id: str, max_tokens: int, round_number: int) -> LeaseGrant | None:
        """Lease a pool range as the mixture asks, sized to the worker; None only for a corpus without tokens.

        Raises Backoff while a failing worker must wait, AllocationEnding when its allocation is nearly over.
        """
        if max_tokens <= 0:
            raise LeaseError(f"max_tokens must be positive, got {max_tokens}")
        with self._lock:
            now = self._clock()
            if now - self._expired_at >= 1.0:  # the periodic expiry runs every second besides
                with self._sessions.begin() as session:  # committed even when this worker is refused below
                    self._expire(session, now)
            with self._sessions.begin() as session:
                return self._grant(session, worker_id, max_tokens, round_number, now)

    def _grant(self, session: Session, worker_id: str, max_tokens: int, round_number: int, now: float) -> LeaseGrant | None:
        worker = session.get(Worker, worker_id)
        if worker.backoff_until > now:
            raise Backoff(worker.backoff_until - now, worker.failures)
        terms = self._terms(round_number)
        if terms.policy is not None:
            facts = WorkerFacts(worker.tokens_per_second, worker.available_until, worker.failures)
            size = lease_size(terms.policy, facts, now)
            if size is None:
                raise AllocationEnding(
                    f"the allocation ends in {worker.available_until - now:.0f} s, too soon to train a lease: "
                    "report what is trained, release the rest and stop"
                )
            max_tokens = min(max_tokens, size)
        token_range = self._next_pool_range(session, terms.mixture)
        if token_range is None:
            return None
        if token_range.end - token_range.start > max_tokens:
            # Split: the tail stays in the pool as its own range.
            session.add(token_range.piece(token_range.start + max_tokens, token_range.end, "pool"))
            token_range.end = token_range.start + max_tokens
        token_range.state = "leased"
        count_assigned(session, token_range.source, token_range.end - token_range.start)
        earlier = session.scalar(
            select(func.count(Lease.id)).where(
                Lease.shard_id == token_range.shard_id,
                Lease.epoch == token_range.epoch,
                Lease.start == token_range.start,
            )
        )
        lease = Lease(
            range_id=token_range.id, worker_id=worker_id, shard_id=token_range.shard_id,
            epoch=token_range.epoch, start=token_range.start, end=token_range.end,
            round=round_number, attempt=earlier + 1, state="granted",
            deadline=now + self.lease_seconds, granted_at=now,
        )
        session.add(lease)
        session.flush()
        return LeaseGrant(lease=lease, shard=session.get(Shard, token_range.shard_id))

    def complete_round(self, worker_id: str, report: RoundReport) -> RoundRecorded:
        """Record a round: each lease's trained prefix (the rest returns to the pool), all or nothing."""
        if not report.leases:
            raise LeaseError("a round report needs at least one lease (release leases that trained nothing)")
        lease_ids = [lease_id for lease_id, _ in report.leases]
        if len(set(lease_ids)) != len(lease_ids):
            raise LeaseError(f"lease ids repeat in one round report: {lease_ids}")
        with self._lock, self._sessions.begin() as session:
            now = self._clock()
            replayed = self._recorded_before(session, worker_id, report)
            if replayed is not None:
                return replayed
            round_row = self._round_row(session, report, now)
            if round_row.params_digest != report.params_digest:
                # Another group finished this round first, on other parameters. One model per
                # round: this report's tokens go back to the pool and its worker re-syncs.
                for lease_id, _ in report.leases:
                    self._own_granted_lease(session, worker_id, lease_id)
                return RoundRecorded(False, round_row.params_digest, [], self._lineage_head(session))
            worker = session.get(Worker, worker_id)
            config_version = self._terms(report.round).config_version
            records = [
                self._record_lease(session, worker, report, config_version, lease_id, tokens, now)
                for lease_id, tokens in report.leases
            ]
            tokens = sum(tokens for _, tokens in report.leases)
            session.add(
                Contribution(
                    round=report.round, worker_id=worker_id, tokens=tokens, loss=report.loss,
                    group_size=report.group_size, bytes_sent=report.bytes_sent, inner_seconds=report.inner_seconds,
                    wall_seconds=report.wall_seconds, params_digest=report.params_digest, created_at=now,
                )
            )
            round_row.reports += 1
            round_row.tokens += tokens
            round_row.loss_sum += report.loss
            round_row.max_group_size = max(round_row.max_group_size, report.group_size)
            worker.last_round, worker.last_loss, worker.last_seen = report.round, report.loss, now
            worker.failures, worker.backoff_until = 0, 0.0  # a reported round ends any failure streak
            session.flush()
            return RoundRecorded(True, report.params_digest, [r.id for r in records], self._lineage_head(session))

    def _recorded_before(self, session: Session, worker_id: str, report: RoundReport) -> RoundRecorded | None:
        """The answer already given, when this report was recorded before and its reply lost (a retry).

        A coordinator killed after committing a report but before replying sees the same
        report again once restarted: it must answer as the first time, not refuse it.
        """
        leases = [session.get(Lease, lease_id) for lease_id, _ in report.leases]
        if not any(lease is not None and lease.state == "completed" and lease.worker_id == worker_id
                   and lease.round == report.round for lease in leases):
            return None
        for (lease_id, tokens), lease in zip(report.leases, leases):
            if lease is None or (lease.state, lease.worker_id, lease.round, lease.tokens_consumed) != (
                "completed", worker_id, report.round, tokens
            ):
                raise LeaseError(
                    f"round {report.round} was already reported with other leases or token counts than this "
                    f"report's (lease {lease_id}): acquire new leases"
                )
        records = {r.lease_id: r.id for r in session.scalars(
            select(LineageRecord).where(LineageRecord.lease_id.in_([lease_id for lease_id, _ in report.leases])))}
        digest = session.get(Round, report.round).params_digest
        return RoundRecorded(True, digest, [records[lease_id] for lease_id, _ in report.leases], self._lineage_head(session))

    def extend_leases_after_restart(self) -> int:
        """Give every granted lease time to be heartbeaten again; returns how many.

        While the coordinator was down no heartbeat could extend a deadline: expiring those
        leases would throw away rounds that workers kept training through the outage. Workers
        retry with a back-off of up to 5 s, so the grace is two lease periods, and at least 30 s.
        """
        grace = max(2 * self.lease_seconds, 30.0)
        with self._lock, self._sessions.begin() as session:
            return session.execute(
                update(Lease).where(Lease.state == "granted").values(deadline=self._clock() + grace)
            ).rowcount

    @staticmethod
    def _lineage_head(session: Session) -> int:
        return session.scalar(select(func.max(LineageRecord.id))) or 0

    def _record_lease(
        self, session: Session, worker: Worker, report: RoundReport, config_version: str, lease_id: int,
        tokens_consumed: int, now: float,
    ) -> LineageRecord:
        lease = self._own_granted_lease(session, worker.id, lease_id)
        size = lease.end - lease.start
        if not 0 < tokens_consumed <= size:
            raise LeaseError(
                f"lease {lease.id} covers {size} tokens; tokens_consumed must be in 1..{size}, "
                f"got {tokens_consumed} (release the lease if nothing was trained)"
            )
        trained_end = lease.start + tokens_consumed
        self._return_tail_to_pool(session, lease, trained_end)
        session.get(TokenRange, lease.range_id).state = "trained"
        lease.state, lease.finished_at, lease.tokens_consumed = "completed", now, tokens_consumed
        record = LineageRecord(
            round=report.round, worker_id=worker.id, institution=worker.institution,
            lease_id=lease.id, shard_id=lease.shard_id, epoch=lease.epoch,
            start=lease.start, end=trained_end, loss=report.loss,
            pseudo_gradient_digest=report.pseudo_gradient_digest,
            config_version=config_version, device=worker.device, precision=worker.precision, created_at=now,
        )
        session.add(record)
        return record

    def release(self, worker_id: str, lease_id: int) -> None:
        with self._lock, self._sessions.begin() as session:
            lease = self._own_granted_lease(session, worker_id, lease_id)
            self._return_to_pool(session, lease, "released", self._clock())

    def heartbeat(self, worker_id: str, round_number: int, loss: float, tokens_per_second: float) -> None:
        """Mark the worker alive and extend its leases' deadlines, as of now (written in a batch: HeartbeatBuffer)."""
        self._heartbeats.record(worker_id, round_number, loss, tokens_per_second, self._clock())

    def flush_heartbeats(self) -> int:
        with self._lock, self._sessions.begin() as session:
            return self._heartbeats.write(session, self.lease_seconds)

    def expire_overdue(self) -> int:
        """Return the ranges of leases past their deadline to the pool; returns how many expired."""
        with self._lock, self._sessions.begin() as session:
            return self._expire(session, self._clock())

    # -- rounds --------------------------------------------------------------------------

    def current_round(self) -> int:
        """The next round to train: one past the last round any worker completed."""
        with self._sessions() as session:
            last = session.scalar(select(func.max(Round.number)))
            return 0 if last is None else last + 1

    def run_complete(self, round_number: int) -> bool:
        """True once the worker's round, or the last round recorded, is the run's last.

        A worker that missed the last round cannot catch up once the peers holding that
        round's state have left: for it too the run is over, not a round to train again.
        """
        return round_number >= self.total_rounds or self.current_round() >= self.total_rounds

    def live_workers(self, within_seconds: float) -> int:
        self.flush_heartbeats()
        with self._sessions() as session:
            cutoff = self._clock() - within_seconds
            return session.scalar(select(func.count(Worker.id)).where(Worker.last_seen >= cutoff)) or 0

    # -- internals -----------------------------------------------------------------------

    def _own_granted_lease(self, session: Session, worker_id: str, lease_id: int) -> Lease:
        lease = session.get(Lease, lease_id, with_for_update=True)
        if lease is None:
            raise LeaseError(f"no lease {lease_id}: acquire a new lease")
        if lease.worker_id != worker_id:
            raise LeaseError(f"lease {lease_id} belongs to another worker")
        if lease.state != "granted":
            raise LeaseError(
                f"lease {lease_id} is {lease.state}, not granted (its deadline passed or it was "
                "already reported): acquire a new lease"
            )
        return lease

    def _next_pool_range(self, session: Session, voted: dict[str, float]) -> TokenRange | None:
        """The oldest pool range of the source furthest below its share of leased tokens.

        A source whose ranges are all out opens its next epoch, so each source is
        repeated or left partly unread as its weight asks, whatever its size.
        """
        for source in mixture_order(self._weights(session, voted), self._assigned_tokens(session)):
            token_range = self._oldest_pool_range(session, source)
            if token_range is None and not self._has_pool_range(session, source):
                token_range = self._open_next_epoch(session, source)
            if token_range is not None:
                return token_range
        return None  # no tokens, or every pool range is being decided on by another process

    def _weights(self, session: Session, voted: dict[str, float]) -> dict[str, float]:
        """Weights of the sources that have tokens to lease: the corpus's (read again every few seconds), as voted."""
        read_at, weights = self._weights_cache
        if self._clock() - read_at < 5.0:
            return {**weights, **{k: w for k, w in voted.items() if k in weights}}
        rows = session.execute(
            select(Source.name, Source.weight).where(Source.name.in_(select(Shard.source).where(Shard.tokens > 0)))
        ).all()
        self._weights_cache = (self._clock(), {name: weight for name, weight in rows})
        return self._weights(session, voted)

    @staticmethod
    def _assigned_tokens(session: Session) -> dict[str, int]:
        """Tokens out on lease or trained, per source, over all epochs."""
        return {name: tokens for name, tokens in session.execute(select(Source.name, Source.assigned_tokens))}

    @staticmethod
    def _oldest_pool_range(session: Session, source: str) -> TokenRange | None:
        """The source's next range to lease, locked; ranges another transaction holds are skipped."""
        return session.scalar(
            select(TokenRange)
            .where(TokenRange.state == "pool", TokenRange.source == source)
            .order_by(TokenRange.epoch, TokenRange.shard_date, TokenRange.shard_id, TokenRange.start)
            .limit(1)
            .with_for_update(skip_locked=True)
        )

    @staticmethod
    def _has_pool_range(session: Session, source: str) -> bool:
        pool = select(TokenRange.id).where(TokenRange.state == "pool", TokenRange.source == source)
        return session.scalar(select(pool.exists())) or False

    def _expire(self, session: Session, now: float) -> int:
        self._heartbeats.write(session, self.lease_seconds)  # a heartbeat not yet written must still save its leases
        self._expired_at = now
        overdue = session.scalars(
            select(Lease).where(Lease.state == "granted", Lease.deadline < now).with_for_update(skip_locked=True)
        ).all()
        for lease in overdue:
            self._return_to_pool(session, lease, "expired", now)
        for worker_id in {lease.worker_id for lease in overdue}:  # one failure per worker, however many leases
            worker = session.get(Worker, worker_id, with_for_update=True)
            worker.failures += 1
            worker.backoff_until = now + backoff_seconds(worker.failures)
        return len(overdue)

    def _return_to_pool(self, session: Session, lease: Lease, state: str, now: float) -> None:
        token_range = session.get(TokenRange, lease.range_id)
        token_range.state = "pool"
        count_assigned(session, token_range.source, -(token_range.end - token_range.start))
        lease.state, lease.finished_at = state, now

    def _return_tail_to_pool(self, session: Session, lease: Lease, trained_end: int) -> None:
        if trained_end == lease.end:
            return
        token_range = session.get(TokenRange, lease.range_id)
        token_range.end = trained_end
        session.add(token_range.piece(trained_end, lease.end, "pool"))
        count_assigned(session, token_range.source, -(lease.end - trained_end))

    @staticmethod
    def _round_row(session: Session, report: RoundReport, now: float) -> Round:
        """The round's row, locked; the first report of a round creates it with its parameters' digest.

        Insert-if-absent, so two processes recording a round's first reports at once agree on one row.
        """
        insert = {"postgresql": postgresql_insert, "sqlite": sqlite_insert}[session.get_bind().dialect.name]
        session.execute(
            insert(Round)
            .values(number=report.round, first_report_at=now, reports=0, tokens=0, loss_sum=0.0, max_group_size=0,
                    params_digest=report.params_digest)
            .on_conflict_do_nothing(index_elements=["number"])
        )
        return session.get(Round, report.round, with_for_update=True, populate_existing=True)

    def _open_next_epoch(self, session: Session, source: str) -> TokenRange | None:
        """Put the source's shards back in the pool as its next epoch (none of its ranges is in the pool).

        Ranges of the older epoch may still be out on lease (or come back on expiry):
        each epoch keeps its own tiling, so no worker idles waiting for stragglers.
        """
        session.get(Source, source, with_for_update=True)  # one epoch opening per source at a time
        if self._has_pool_range(session, source):  # another process opened it while this one waited
            return self._oldest_pool_range(session, source)
        shards = session.scalars(select(Shard).where(Shard.source == source, Shard.tokens > 0)).all()
        epoch = session.scalar(
            select(func.max(TokenRange.epoch)).where(TokenRange.shard_id.in_([shard.id for shard in shards]))
        )
        if epoch is None:
            return None
        for shard in shards:
            session.add(TokenRange.whole(shard, epoch + 1))
        session.flush()
        return self._oldest_pool_range(session, source)
