"""The network as `essaim status` shows it: workers, leases, rounds, throughput and the epoch's ETA.

Public and read-only: what anyone watching a community run may see (no keys, no data).
"""

from __future__ import annotations

import time

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from coordinator.store import Lease, Round, TokenRange, Worker
from protocol import essaim_pb2 as pb

RECENT_ROUNDS = 5


def network_status(
    sessions: sessionmaker[Session], run_id: str, total_rounds: int, live_within_seconds: float
) -> pb.StatusReply:
    now = time.time()
    with sessions() as session:
        leases_by_worker = dict(session.execute(
            select(Lease.worker_id, func.count(Lease.id)).where(Lease.state == "granted").group_by(Lease.worker_id)
        ).all())
        workers = [
            pb.WorkerStatus(
                name=w.name, institution=w.institution, trust_class=w.trust_class, device=w.device, precision=w.precision,
                tokens_per_second=w.tokens_per_second, round=w.last_round, live=w.last_seen >= now - live_within_seconds,
                leases=leases_by_worker.get(w.id, 0), available_until=w.available_until,
            )
            for w in session.scalars(select(Worker).order_by(Worker.institution, Worker.trust_class, Worker.name))
        ]
        leases_out, tokens_out = session.execute(
            select(func.count(Lease.id), func.coalesce(func.sum(Lease.end - Lease.start), 0)).where(Lease.state == "granted")
        ).one()
        epoch, epoch_tokens, epoch_trained = _oldest_open_epoch(session)
        rounds = session.scalars(select(Round).order_by(Round.number.desc()).limit(RECENT_ROUNDS)).all()
        last = session.scalar(select(func.max(Round.number)))
    throughput = sum(w.tokens_per_second for w in workers if w.live)
    remaining = epoch_tokens - epoch_trained
    return pb.StatusReply(
        run_id=run_id, current_round=0 if last is None else last + 1, total_rounds=total_rounds, workers=workers,
        leases_out=leases_out, tokens_out=int(tokens_out), epoch=epoch, epoch_tokens=epoch_tokens,
        epoch_tokens_trained=epoch_trained, tokens_per_second=throughput,
        eta_seconds=remaining / throughput if throughput > 0 and remaining > 0 else 0.0,
        recent_rounds=[
            pb.RoundStatus(number=r.number, reports=r.reports, tokens=r.tokens,
                           mean_loss=r.loss_sum / max(r.reports, 1), group_size=r.max_group_size)
            for r in reversed(rounds)
        ],
    )


def _oldest_open_epoch(session: Session) -> tuple[int, int, int]:
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
