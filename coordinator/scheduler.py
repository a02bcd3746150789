"""Leases, rounds and lineage: the coordinator's decisions, on top of the store.

On SQLite a lock serialises the process's decisions (one writer at a time). On
PostgreSQL, rows are locked as they are decided on (SELECT ... FOR UPDATE, SKIP LOCKED
for pool ranges and overdue leases), so a process's threads, and several coordinator
processes sharing a database, decide at once without two of them granting the same
tokens. What else sharing takes:
- a transaction the database aborts for a deadlock with another process's runs again
  (coordinator/conflicts.py);
- each process writes the heartbeats it received once a second, so a lease expires only
  `expiry_margin` after its deadline: a heartbeat that another process holds unwritten
  still saves it;
- nonces are claimed in the database (coordinator/shared_nonces.py).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from coordinator import grant_sql, report_sql
from coordinator.conflicts import retry_conflicts
from coordinator.grant_sql import PoolRange
from coordinator.heartbeats import HeartbeatBuffer
from coordinator.lease_sizing import WorkerFacts, backoff_seconds, lease_size
from coordinator.leases import HELD, LeaseError, own_lease, return_to_pool
from coordinator.mixture import mixture_order
from coordinator.round_terms import RoundTerms
from coordinator.rounds import RoundBook, RoundRecorded, RoundReport
from coordinator.shared_nonces import SharedNonces
from coordinator.store import FiledReport, Lease, Round, Shard, Source, TokenRange, Worker, flushed_connection
from coordinator.verification import (
    Assignment, Quarantined, Sampler, Verdict, open_checks, refuse_if_quarantined, retrain_unverified, submit_verdict,
    take_check,
)

T = TypeVar("T")

__all__ = ["AllocationEnding", "AtLimit", "Backoff", "LeaseError", "LeaseLimits", "Quarantined", "RoundOver",
           "RoundRecorded", "RoundReport", "Scheduler"]


class Backoff(LeaseError):
    """The worker's leases kept expiring: no new lease before ``retry_after`` seconds."""

    def __init__(self, retry_after: float, failures: int) -> None:
        super().__init__(f"{failures} lease(s) in a row expired: ask again in {retry_after:.0f} s")
        self.retry_after = retry_after


class AllocationEnding(LeaseError):
    """Too little of the worker's allocation is left to train a lease."""


class RoundOver(LeaseError):
    """The worker asked for a lease in a round already decided: it must load the swarm's state."""

    def __init__(self, asked: int, open_round: int) -> None:
        super().__init__(f"round {asked} is over: the run is at round {open_round}; load the swarm's state")
        self.open_round = open_round


class NotOpenYet(LeaseError):
    """The worker asked for a lease in a round after the open one, which it may not train yet."""

    def __init__(self, asked: int, open_round: int) -> None:
        super().__init__(f"round {asked} is not open yet: the run is at round {open_round}")


class AtLimit(LeaseError):
    """The worker holds as many leases or tokens as one worker may: it reports or releases some first."""


@dataclass(frozen=True)
class LeaseLimits:
    """What one worker may hold: strangers must not hoard the pool (docs/ARCHITECTURE.md, "Rounds and trust")."""

    min_tokens: int = 1               # a smaller request is granted this much (it trains a prefix)
    max_leases: int = 1 << 30         # leases held at once (granted or awaiting their round's decision)
    max_tokens: int = 1 << 62         # tokens held at once
    max_seconds: float = math.inf     # a lease ends this long after its grant, heartbeats or not
    decision_seconds: float = math.inf  # then a group's leading report stops waiting for leases out (rounds.py)
    idle_stake: int = 0               # what a live worker without a lease of the open round may still stake
    live_seconds: float = 15.0        # heard from this recently: live


@dataclass(frozen=True)
class LeaseGrant:
    lease: Lease
    shard: Shard
    round_tokens: int  # leased to the worker in this round so far, this lease included: its round credential's
    trust_class: str


class Scheduler:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        lease_seconds: float,
        total_rounds: int,
        clock: Callable[[], float] = time.time,
        terms: Callable[[int], RoundTerms] = lambda _round: RoundTerms(),
        limits: LeaseLimits = LeaseLimits(),
        sampler: Sampler | None = None,  # None: no checks (verify_fraction 0, coordinator/verification.py)
        lease_ahead: bool = False,  # overlapped averaging: a worker may lease round r+1 while round r averages
        expiry_margin: float = 0.0,  # several processes: a lease expires this long after its deadline
        shared_nonces: SharedNonces | None = None,  # several processes: heartbeats' nonces claimed as written
    ) -> None:
        self._sessions = sessions
        self.lease_seconds = lease_seconds
        self.total_rounds = total_rounds
        self.limits = limits
        self._terms = terms  # lease policy, mixture and config version in force at a round
        self._sampler = sampler
        self._lease_ahead = lease_ahead
        self._rounds = RoundBook(lambda round_: terms(round_).config_version, limits.decision_seconds,
                                 limits.idle_stake, limits.live_seconds,
                                 on_kept=self._open_checks if sampler is not None else None)
        self._heartbeats = HeartbeatBuffer(limits.max_seconds, shared_nonces)
        self._expiry_margin = expiry_margin
        self._expired_at = -math.inf
        self._weights_cache: tuple[float, dict[str, float]] = (-math.inf, {})
        self._shards: dict[str, Shard] = {}
        self._clock = clock
        # SQLite has one writer: a lock serialises this process's transactions. On PostgreSQL rows are locked
        # (FOR UPDATE, SKIP LOCKED), so this process's threads run theirs at once, as other processes do, and
        # one transaction's round trips to the database do not hold up the others.
        sqlite = sessions.kw["bind"].dialect.name == "sqlite"
        self._lock: contextlib.AbstractContextManager = threading.Lock() if sqlite else contextlib.nullcontext()

    # -- leases --------------------------------------------------------------------------

    def acquire(self, worker_id: str, max_tokens: int, round_number: int, peer_id: str = "") -> LeaseGrant | None:
        """Lease a pool range as the mixture asks, sized to the worker; None only for a corpus without tokens.

        Raises Quarantined for a worker a check convicted, Backoff while a failing worker must wait,
        AllocationEnding when its allocation is nearly over, RoundOver when its round is decided
        already, and AtLimit when it holds as much as one worker may. `peer_id`: the hivemind peer
        its round credential names, recorded so that reducers' witnesses map to the worker.
        """
        if max_tokens <= 0:
            raise LeaseError(f"max_tokens must be positive, got {max_tokens}")
        with self._lock:
            now = self._clock()
            if now - self._expired_at >= 1.0:  # the periodic expiry runs every second besides
                self._transaction(lambda session: self._expire(session, now))  # even when this worker is refused
            return self._transaction(lambda session: self._grant(session, worker_id, max_tokens, round_number, now,
                                                                 peer_id))

    def _transaction(self, work: Callable[[Session], T]) -> T:
        """`work` in one transaction, committed; run again if the database aborts it for a conflict with
        another process. Heartbeats it was writing go back to the buffer if it fails. Called under the lock."""
        def attempt() -> T:
            with self._sessions.begin() as session:
                result = work(session)
            self._heartbeats.written()
            return result

        return retry_conflicts(attempt, on_abort=self._heartbeats.put_back)

    def _grant(self, session: Session, worker_id: str, max_tokens: int, round_number: int, now: float,
               peer_id: str = "") -> LeaseGrant | None:
        db = flushed_connection(session)  # the grant's statements are plain SQL (coordinator/grant_sql.py)
        worker = db.execute(grant_sql.WORKER, {"worker": worker_id}).one()
        if worker.quarantined_at is not None:
            refuse_if_quarantined(session, worker_id)  # raises, saying why
        open_round = self._open_round(session)
        if round_number < open_round:
            raise RoundOver(round_number, open_round)
        if round_number > open_round and not self._may_lease_ahead(session, worker_id, round_number, open_round):
            raise NotOpenYet(round_number, open_round)
        if peer_id and peer_id != worker.peer_id:
            db.execute(grant_sql.SET_PEER_ID, {"peer_id": peer_id, "worker": worker_id})
        if worker.backoff_until > now:
            raise Backoff(worker.backoff_until - now, worker.failures)
        max_tokens = min(max(max_tokens, self.limits.min_tokens), self._room(session, worker_id))
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
        pool_range = self._next_pool_range(session, terms.mixture)
        if pool_range is None:
            return None
        end = min(pool_range.end, pool_range.start + max_tokens)  # a longer range is split: its tail stays
        grant_sql.lease_range(db, pool_range, end)
        earlier = db.execute(grant_sql.EARLIER_ATTEMPTS, {"shard_id": pool_range.shard_id, "epoch": pool_range.epoch,
                                                          "start": pool_range.start}).scalar()
        lease = Lease(range_id=pool_range.id, worker_id=worker_id, shard_id=pool_range.shard_id,
                      epoch=pool_range.epoch, start=pool_range.start, end=end, round=round_number,
                      attempt=earlier + 1, state="granted",
                      deadline=now + min(self.lease_seconds, self.limits.max_seconds), granted_at=now,
                      finished_at=None, tokens_consumed=0)
        lease.id = db.execute(grant_sql.INSERT_LEASE, {
            "range_id": lease.range_id, "worker_id": worker_id, "shard_id": lease.shard_id, "epoch": lease.epoch,
            "start": lease.start, "end": lease.end, "round": lease.round, "attempt": lease.attempt,
            "deadline": lease.deadline, "granted_at": now}).scalar()
        round_tokens = db.execute(grant_sql.ROUND_TOKENS, {"worker": worker_id, "round": round_number}).scalar()
        return LeaseGrant(lease=lease, shard=self._shard(session, pool_range.shard_id), round_tokens=round_tokens,
                          trust_class=worker.trust_class)

    def _shard(self, session: Session, shard_id: str) -> Shard:
        """A shard's row, read once: a run's shards never change (a lease names its file, digest and size)."""
        shard = self._shards.get(shard_id)
        if shard is None:
            shard = self._shards[shard_id] = session.get(Shard, shard_id)
        return shard

    def _may_lease_ahead(self, session: Session, worker_id: str, round_number: int, open_round: int) -> bool:
        """Overlapped averaging: a worker that trained the open round (it holds leases of it, reported or
        still averaging) trains the next one meanwhile. So does one that joins (or caught up) while others
        already train the next round and the open one has a group without it (two workers or more hold
        its leases): it would come too late to that group, while a lone holder would wait for it. One
        round ahead, no more."""
        if not self._lease_ahead or round_number != open_round + 1:
            return False
        held = Lease.state.in_(HELD)
        if session.scalar(select(Lease.id).where(Lease.worker_id == worker_id, Lease.round == open_round, held)
                          .limit(1)) is not None:
            return True
        others_ahead = session.scalar(select(Lease.id).where(Lease.round == round_number, held).limit(1)) is not None
        open_group = session.scalar(select(func.count(func.distinct(Lease.worker_id)))
                                    .where(Lease.round == open_round, held))
        return others_ahead and open_group >= 2

    def complete_round(self, worker_id: str, report: RoundReport) -> RoundRecorded:
        """File a round report; recorded, not kept or pending as coordinator/rounds.py decides. All or nothing."""
        if not report.leases:
            raise LeaseError("a round report needs at least one lease (release leases that trained nothing)")
        if len(report.leases) > self.limits.max_leases:
            raise LeaseError(f"a round report names {len(report.leases)} leases; a worker holds at most "
                             f"{self.limits.max_leases}")
        lease_ids = [lease_id for lease_id, _ in report.leases]
        if len(set(lease_ids)) != len(lease_ids):
            raise LeaseError(f"lease ids repeat in one round report: {lease_ids}")

        def record(session: Session) -> RoundRecorded:
            if report_sql.is_quarantined(flushed_connection(session), worker_id):
                refuse_if_quarantined(session, worker_id)  # nothing of a quarantined worker is recorded: says why
            return self._rounds.report(session, worker_id, report, self._open_round(session), self._clock())

        with self._lock:
            return self._transaction(record)

    # -- checked work (coordinator/verification.py) ----------------------------------------

    def _open_checks(self, session: Session, round_number: int, kept: list[FiledReport], now: float) -> None:
        open_checks(session, round_number, self._sampler, now, kept)

    def take_check(self, validator_id: str) -> Assignment | None:
        """The next check for a certified validator (NotAValidator for another); None when none is open.

        A check assigned two lease periods ago without a verdict goes to the next validator that asks.
        """
        with self._lock:
            return self._transaction(lambda session: take_check(session, validator_id, self._clock(),
                                                                reassign_after=2 * self.lease_seconds))

    def retrain(self, worker_ids: set[str]) -> int:
        """Return the named workers' unverified tokens to the pool (a ledger's "retrain"); the tokens returned."""
        if not worker_ids:
            return 0
        with self._lock:
            return self._transaction(lambda session: retrain_unverified(session, worker_ids, self._clock()))

    def submit_verdict(self, validator_id: str, verdict: Verdict) -> None:
        """Apply a validator's verdict: credit, quarantine or re-queue (coordinator/verification.py)."""
        with self._lock:
            self._transaction(lambda session: submit_verdict(session, validator_id, verdict, self._clock()))

    def _room(self, session: Session, worker_id: str) -> int:
        """How many more tokens the worker may lease now; AtLimit when it holds as much as it may."""
        count, tokens = flushed_connection(session).execute(grant_sql.HELD_BY_WORKER, {"worker": worker_id}).one()
        if count >= self.limits.max_leases or tokens >= self.limits.max_tokens:
            raise AtLimit(
                f"this worker holds {count} leases ({tokens} tokens); one worker may hold at most "
                f"{self.limits.max_leases} leases and {self.limits.max_tokens} tokens: report or release some first"
            )
        return self.limits.max_tokens - tokens

    def extend_leases_after_restart(self) -> int:
        """Give every granted lease time to be heartbeaten again; returns how many.

        While the coordinator was down no heartbeat could extend a deadline: expiring those
        leases would throw away rounds that workers kept training through the outage. Workers
        retry with a back-off of up to 5 s, so the grace is two lease periods, and at least 30 s.
        """
        grace = max(2 * self.lease_seconds, 30.0)
        with self._lock:
            return self._transaction(lambda session: session.execute(
                update(Lease).where(Lease.state == "granted").values(deadline=self._clock() + grace)).rowcount)

    def release(self, worker_id: str, lease_id: int) -> None:
        def release(session: Session) -> None:
            lease = own_lease(session, worker_id, lease_id)
            return_to_pool(session, lease, "released", self._clock())
            if lease.round == self._open_round(session):  # fewer tokens out: the round may be settled now
                self._rounds.decide(session, lease.round, self._clock())

        with self._lock:
            self._transaction(release)

    def heartbeat(self, worker_id: str, round_number: int, loss: float, tokens_per_second: float,
                  nonce: bytes = b"", forget_nonce_at: float = 0.0) -> None:
        """Mark the worker alive and extend its leases' deadlines, as of now (written in a batch: HeartbeatBuffer).
        `nonce`: the request's, claimed when written where processes share the database."""
        self._heartbeats.record(worker_id, round_number, loss, tokens_per_second, self._clock(), nonce, forget_nonce_at)

    def flush_heartbeats(self) -> int:
        with self._lock:
            return self._transaction(lambda session: self._heartbeats.write(session, self.lease_seconds, self._clock()))

    def expire_overdue(self) -> int:
        """Return the ranges of leases past their deadline to the pool; returns how many expired."""
        with self._lock:
            return self._transaction(lambda session: self._expire(session, self._clock()))

    # -- rounds --------------------------------------------------------------------------

    def current_round(self) -> int:
        """The open round: one past the last decided round (coordinator/rounds.py)."""
        with self._sessions() as session:
            return self._open_round(session)

    def quarantined_workers(self) -> frozenset[str]:
        """The ids of workers a failed check quarantined (a few, however large the swarm)."""
        with self._sessions() as session:
            return frozenset(session.scalars(select(Worker.id).where(Worker.quarantined_at.is_not(None))))

    def kept_params_digest(self, round_number: int) -> str:
        """The parameters a decided round kept ("" for a round not decided): what a state download must match."""
        if round_number < 0:
            return ""
        with self._sessions() as session:
            round_row = session.get(Round, round_number)
            return round_row.params_digest if round_row is not None else ""

    @staticmethod
    def _open_round(session: Session) -> int:
        last = flushed_connection(session).execute(grant_sql.LAST_ROUND).scalar()
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
            return session.scalar(select(func.count(Worker.id)).where(Worker.last_seen >= cutoff,
                                                                      Worker.quarantined_at.is_(None))) or 0

    # -- internals -----------------------------------------------------------------------

    def _next_pool_range(self, session: Session, voted: dict[str, float]) -> PoolRange | None:
        """The oldest pool range of the source furthest below its share of leased tokens.

        A source whose ranges are all out opens its next epoch, so each source is
        repeated or left partly unread as its weight asks, whatever its size.
        """
        db = flushed_connection(session)
        assigned = dict(db.execute(grant_sql.ASSIGNED_TOKENS).all())  # leased or trained, per source, all epochs
        for source in mixture_order(self._weights(session, voted), assigned):
            token_range = grant_sql.oldest_pool_range(db, source)
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
    def _has_pool_range(session: Session, source: str) -> bool:
        pool = select(TokenRange.id).where(TokenRange.state == "pool", TokenRange.source == source)
        return session.scalar(select(pool.exists())) or False

    def _expire(self, session: Session, now: float) -> int:
        self._expired_at = now  # first: this thread's turn, other threads' grants skip theirs
        self._heartbeats.write(session, self.lease_seconds, now)  # a heartbeat not yet written must still save its leases
        overdue = session.scalars(
            select(Lease).where(Lease.state == "granted", Lease.deadline < now - self._expiry_margin)
            .with_for_update(skip_locked=True)
        ).all()
        for lease in overdue:
            return_to_pool(session, lease, "expired", now)
        for worker_id in {lease.worker_id for lease in overdue}:  # one failure per worker, however many leases
            worker = session.get(Worker, worker_id, with_for_update=True)
            worker.failures += 1
            worker.backoff_until = now + backoff_seconds(worker.failures)
        # Fewer tokens out, or a group's decision window passed: the open round may be settled now.
        self._rounds.decide(session, self._open_round(session), now)
        return len(overdue)

    def _open_next_epoch(self, session: Session, source: str) -> PoolRange | None:
        """Put the source's shards back in the pool as its next epoch (none of its ranges is in the pool).

        Ranges of the older epoch may still be out on lease (or come back on expiry):
        each epoch keeps its own tiling, so no worker idles waiting for stragglers.
        """
        session.get(Source, source, with_for_update=True)  # one epoch opening per source at a time
        if self._has_pool_range(session, source):  # another process opened it while this one waited
            return grant_sql.oldest_pool_range(flushed_connection(session), source)
        shards = session.scalars(select(Shard).where(Shard.source == source, Shard.tokens > 0)).all()
        epoch = session.scalar(
            select(func.max(TokenRange.epoch)).where(TokenRange.shard_id.in_([shard.id for shard in shards]))
        )
        if epoch is None:
            return None
        for shard in shards:
            session.add(TokenRange.whole(shard, epoch + 1))
        session.flush()
        return grant_sql.oldest_pool_range(flushed_connection(session), source)
