"""Read-only views of the store for live displays: workers' progress and rounds."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from coordinator.store import Contribution, LineageRecord, Round, Worker


@dataclass(frozen=True)
class WorkerProgress:
    name: str
    institution: str
    round: int
    loss: float | None
    tokens_per_second: float
    tokens_trained: int
    bytes_sent: int          # averaging traffic, all rounds
    compute_share: float     # time in inner steps / wall time, over its rounds (0 before the first)


@dataclass(frozen=True)
class RoundSummary:
    number: int
    reports: int
    tokens: int
    mean_loss: float
    max_group_size: int


def worker_progress(sessions: sessionmaker[Session]) -> list[WorkerProgress]:
    trained = (
        select(LineageRecord.worker_id, func.sum(LineageRecord.end - LineageRecord.start).label("tokens"))
        .where(LineageRecord.rewound_at.is_(None))
        .group_by(LineageRecord.worker_id)
        .subquery()
    )
    costs = (
        select(
            Contribution.worker_id,
            func.sum(Contribution.bytes_sent).label("bytes"),
            func.sum(Contribution.inner_seconds).label("inner"),
            func.sum(Contribution.wall_seconds).label("wall"),
        )
        .group_by(Contribution.worker_id)
        .subquery()
    )
    with sessions() as session:
        rows = session.execute(
            select(Worker, func.coalesce(trained.c.tokens, 0), func.coalesce(costs.c.bytes, 0),
                   func.coalesce(costs.c.inner, 0.0), func.coalesce(costs.c.wall, 0.0))
            .outerjoin(trained, trained.c.worker_id == Worker.id)
            .outerjoin(costs, costs.c.worker_id == Worker.id)
            .order_by(Worker.name)
        ).all()
    return [
        WorkerProgress(w.name, w.institution, w.last_round, w.last_loss, w.tokens_per_second, int(tokens),
                       int(sent), inner / wall if wall else 0.0)
        for w, tokens, sent, inner, wall in rows
    ]


def rounds(sessions: sessionmaker[Session]) -> list[RoundSummary]:
    with sessions() as session:
        return [
            RoundSummary(r.number, r.reports, r.tokens, r.loss_sum / max(r.reports, 1), r.max_group_size)
            for r in session.scalars(select(Round).order_by(Round.number))
        ]

