"""The network as `essaim status` shows it: workers, leases, rounds, throughput and the epoch's ETA.

Public and read-only: what anyone watching a community run may see (no keys, no data).
Anyone may also poll it, so a reply costs no database scan: the network is read at most
once per `max_age_seconds` into a snapshot that every caller shares, and a reply carries
one page of workers (by name), never all of them.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from coordinator.store import Lease, Round, TokenRange, Worker
from protocol import essaim_pb2 as pb

RECENT_ROUNDS = 5
DEFAULT_PAGE = 50               # workers in a reply that asks for no particular page size
DEFAULT_MAX_AGE_SECONDS = 1.0   # `essaim status` refreshes every 2 s: a fresher view shows nothing more
# A snapshot that took t seconds to read is kept at least this many times t: a database grown
# large then costs status at most a tenth of one core, however many callers poll it.
MAX_SHARE_OF_TIME = 10


class StatusPageError(ValueError):
    """A page of workers the coordinator will not serve; the message says what it will."""


@dataclass(frozen=True)
class _Snapshot:
    reply: pb.StatusReply          # everything but the workers
    workers: list[pb.WorkerStatus]  # every registered worker, by name


class StatusCache:
    """GetStatus replies from one shared snapshot of the network, read again when it is too old.

    Thread-safe: gRPC calls `reply` from many threads; only one of them reads the database
    when the snapshot has aged, the others wait for that reading instead of making their own.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        run_id: str,
        total_rounds: int,
        live_within_seconds: float,
        page_max: int,  # the most workers one reply may list (Bounds.status_page_max)
        max_age_seconds: float = DEFAULT_MAX_AGE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sessions = sessions
        self._run_id = run_id
        self._total_rounds = total_rounds
        self._live_within_seconds = live_within_seconds
        self.page_max = page_max
        self.max_age_seconds = max_age_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._snapshot: _Snapshot | None = None
        self._fresh_until = 0.0
        self.recomputations = 0  # database readings so far: callers inside one window share one

    def reply(self, request: pb.StatusRequest) -> pb.StatusReply:
        """The network, with the workers of the requested page (`worker_limit` 0: the default page)."""
        limit = request.worker_limit or min(DEFAULT_PAGE, self.page_max)
        if request.worker_offset < 0 or limit < 0:
            raise StatusPageError(f"worker_offset {request.worker_offset} and worker_limit {request.worker_limit} "
                                  "must be 0 or positive")
        if limit > self.page_max:
            raise StatusPageError(f"worker_limit {limit} is more than this coordinator serves in one reply "
                                  f"({self.page_max}, status_page_max in the run's bounds); ask for at most {self.page_max} "
                                  "and page through the rest with worker_offset")
        snapshot = self._current()
        reply = pb.StatusReply()
        reply.CopyFrom(snapshot.reply)
        reply.workers.extend(snapshot.workers[request.worker_offset:request.worker_offset + limit])
        return reply

    def _current(self) -> _Snapshot:
        with self._lock:
            started = self._clock()
            if self._snapshot is None or started >= self._fresh_until:
                self._snapshot = _read_network(self._sessions, self._run_id, self._total_rounds,
                                               self._live_within_seconds)
                self.recomputations += 1
                took = self._clock() - started
                self._fresh_until = started + max(self.max_age_seconds, MAX_SHARE_OF_TIME * took)
            return self._snapshot


def _read_network(
    sessions: sessionmaker[Session], run_id: str, total_rounds: int, live_within_seconds: float
) -> _Snapshot:
    now = time.time()
    with sessions() as session:
        leases_by_worker = dict(session.execute(
            select(Lease.worker_id, func.count(Lease.id)).where(Lease.state == "granted").group_by(Lease.worker_id)
        ).all())
        # Columns, not ORM objects: a snapshot of thousands of workers is read once a second.
        rows = session.execute(
            select(Worker.id, Worker.name, Worker.institution, Worker.trust_class, Worker.device, Worker.precision,
                   Worker.tokens_per_second, Worker.last_round, Worker.last_seen, Worker.available_until,
                   Worker.quarantined_at)
            .order_by(Worker.name, Worker.id)  # the id breaks ties: pages must not overlap or skip anyone
        ).all()
        leases_out, tokens_out = session.execute(
            select(func.count(Lease.id), func.coalesce(func.sum(Lease.end - Lease.start), 0)).where(Lease.state == "granted")
        ).one()
        epoch, epoch_tokens, epoch_trained = oldest_open_epoch(session)
        rounds = session.scalars(select(Round).order_by(Round.number.desc()).limit(RECENT_ROUNDS)).all()
        last = session.scalar(select(func.max(Round.number)))
        recent_rounds = [
            pb.RoundStatus(number=r.number, reports=r.reports, tokens=r.tokens,
                           mean_loss=r.loss_sum / max(r.reports, 1), group_size=r.max_group_size)
            for r in reversed(rounds)
        ]
    cutoff = now - live_within_seconds
    workers = [
        pb.WorkerStatus(  # a quarantined worker may still call, but it trains nothing: not live
            name=name, institution=institution, trust_class=trust_class, device=device, precision=precision,
            tokens_per_second=tokens_per_second, round=last_round,
            live=last_seen >= cutoff and quarantined_at is None,
            leases=leases_by_worker.get(worker_id, 0), available_until=available_until,
        )
        for (worker_id, name, institution, trust_class, device, precision, tokens_per_second, last_round, last_seen,
             available_until, quarantined_at) in rows
    ]
    live = [w for w in workers if w.live]
    throughput = sum(w.tokens_per_second for w in live)
    remaining = epoch_tokens - epoch_trained
    summary = pb.StatusReply(
        run_id=run_id, current_round=0 if last is None else last + 1, total_rounds=total_rounds,
        leases_out=leases_out, tokens_out=int(tokens_out), epoch=epoch, epoch_tokens=epoch_tokens,
        epoch_tokens_trained=epoch_trained, tokens_per_second=throughput,
        eta_seconds=remaining / throughput if throughput > 0 and remaining > 0 else 0.0,
        recent_rounds=recent_rounds, workers_total=len(workers), live_workers=len(live),
    )
    return _Snapshot(summary, workers)


def oldest_open_epoch(session: Session) -> tuple[int, int, int]:
    """(epoch, its tokens, its trained tokens) for the oldest epoch with tokens still to train."""
    rows = session.execute(
        select(TokenRange.epoch, TokenRange.state, func.sum(TokenRange.end - TokenRange.start))
        .group_by(TokenRange.epoch, TokenRange.state)
    ).all()
    by_epoch: dict[int, dict[str, int]] = {}
    for epoch, state, tokens in rows:
        by_epoch.setdefault(epoch, {})[state] = int(tokens)
    for epoch in sorted(by_epoch):
        states = by_epoch[epoch]
        if states.get("pool", 0) or states.get("leased", 0):
            return epoch, sum(states.values()), states.get("trained", 0)
    newest = max(by_epoch, default=0)
    total = sum(by_epoch.get(newest, {}).values())
    return newest, total, total
