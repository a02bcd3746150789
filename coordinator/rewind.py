"""Rewind a stopped run to a checkpoint: rounds after it are forgotten and their tokens go back to the pool.

After a crash, the newest checkpoint may be older than the last round the
coordinator recorded: the tokens of the rounds in between were trained, but no
surviving model holds them. Rewinding returns those ranges to the pool (so they
are trained again, once), marks their leases "rewound" and their lineage records
with the time of the rewind (kept for the audit trail), and drops the rounds'
records, so the run goes on from the checkpoint's round.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from coordinator.leases import return_to_pool
from coordinator.store import (Contribution, Evaluation, FiledReport, Lease, LineageRecord, Round, TokenRange,
                               count_assigned)


class RewindRefused(Exception):
    pass


@dataclass(frozen=True)
class Rewound:
    rounds: int
    leases: int
    tokens: int


def untrain(session: Session, record: LineageRecord, now: float) -> int:
    """A trained range back in the pool, to be trained again; its lease is rewound and its record kept, dated.

    Also what a maintainers' "retrain" decision does to a quarantined worker's unverified tokens
    (coordinator/verification.py). Returns the tokens returned.
    """
    lease = session.get(Lease, record.lease_id)
    token_range = session.get(TokenRange, lease.range_id)
    token_range.state = "pool"
    count_assigned(session, token_range.source, -(token_range.end - token_range.start))
    lease.state = "rewound"
    record.rewound_at = now
    return record.end - record.start


def rewind(sessions: sessionmaker[Session], to_round: int, now: float | None = None) -> Rewound:
    """Forget rounds >= to_round. Refused while leases are live (stop the coordinator and workers first)."""
    if to_round < 0:
        raise RewindRefused(f"--to-round must be 0 or more, got {to_round}")
    now = time.time() if now is None else now
    with sessions.begin() as session:
        live = session.scalar(select(func.count(Lease.id)).where(Lease.state == "granted", Lease.deadline > now))
        if live:
            raise RewindRefused(
                f"{live} lease(s) are still live: stop the coordinator and every worker, "
                "wait for the lease deadline, then rewind"
            )
        records = session.scalars(
            select(LineageRecord).where(LineageRecord.round >= to_round, LineageRecord.rewound_at.is_(None))
        ).all()
        tokens = sum(untrain(session, record, now) for record in records)
        for lease in session.scalars(select(Lease).where(Lease.state == "reported", Lease.round >= to_round)):
            return_to_pool(session, lease, "rewound", now)  # filed for a round the rewind forgets
            tokens += lease.end - lease.start
        session.execute(delete(FiledReport).where(FiledReport.round >= to_round))
        rounds = session.scalar(select(func.count(Round.number)).where(Round.number >= to_round)) or 0
        session.execute(delete(Contribution).where(Contribution.round >= to_round))
        session.execute(delete(Evaluation).where(Evaluation.round >= to_round))  # of parameters no model holds now
        session.execute(delete(Round).where(Round.number >= to_round))
        return Rewound(rounds=rounds, leases=len(records), tokens=tokens)
