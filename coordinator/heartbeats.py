"""Heartbeats kept in memory and written in one batch: thousands a second cost a few statements a second.

A heartbeat marks its worker alive (last seen, round, loss, measured throughput) and
extends the deadlines of the worker's leases from the moment it arrived, never past
their hard end (a maximum time after the grant), so heartbeats cannot keep a hoarded
lease alive. The
scheduler writes the buffer every second and before anything that reads what it
changes (expiring leases, counting live workers), so a lease is never expired for a
heartbeat still waiting here.
"""

from __future__ import annotations

import math
import threading

from sqlalchemy import bindparam, case, update
from sqlalchemy.orm import Session

from coordinator.store import Lease, Worker


class HeartbeatBuffer:
    def __init__(self, lease_max_seconds: float = math.inf) -> None:
        self._lease_max_seconds = lease_max_seconds
        self._beats: dict[str, tuple[float, int, float, float]] = {}  # worker -> (time, round, loss, rate)
        self._lock = threading.Lock()

    def record(self, worker_id: str, round_number: int, loss: float, tokens_per_second: float, now: float) -> None:
        with self._lock:
            self._beats[worker_id] = (now, round_number, loss, tokens_per_second)  # the newest one counts

    def write(self, session: Session, lease_seconds: float) -> int:
        """Write and forget what was recorded; returns how many workers were heard from."""
        with self._lock:
            beats, self._beats = self._beats, {}
        if not beats:
            return 0
        workers, leases = Worker.__table__.c, Lease.__table__.c
        session.execute(
            update(Worker.__table__).where(workers.id == bindparam("b_id")).values(
                last_seen=bindparam("b_seen"), tokens_per_second=bindparam("b_rate"),
                last_round=case((workers.last_round < bindparam("b_round"), bindparam("b_round")), else_=workers.last_round),
                last_loss=case((bindparam("b_loss") > 0, bindparam("b_loss")), else_=workers.last_loss),
            ),
            [{"b_id": w, "b_seen": t, "b_round": r, "b_loss": loss, "b_rate": rate} for w, (t, r, loss, rate) in beats.items()],
        )
        deadline = bindparam("b_deadline")
        if math.isfinite(self._lease_max_seconds):
            hard_end = leases.granted_at + self._lease_max_seconds
            deadline = case((hard_end < deadline, hard_end), else_=deadline)
        session.execute(
            update(Lease.__table__).where(leases.worker_id == bindparam("b_id"), leases.state == "granted")
            .values(deadline=deadline),
            [{"b_id": w, "b_deadline": t + lease_seconds} for w, (t, _, _, _) in beats.items()],
        )
        return len(beats)
