"""Heartbeats kept in memory and written in one batch: thousands a second cost a few statements a second.

A heartbeat marks its worker alive (last seen, round, loss, measured throughput) and
extends the deadlines of the worker's leases from the moment it arrived, never past
their hard end (a maximum time after the grant), so heartbeats cannot keep a hoarded
lease alive. The
scheduler writes the buffer every second and before anything that reads what it
changes (expiring leases, counting live workers), so a lease is never expired for a
heartbeat still waiting here (other processes sharing the database expire a lease only
a margin after its deadline: coordinator/scheduler.py). Beats being written stay in memory
until their transaction ends: if it fails, they are put back, not lost.

Where several processes share the database, a beat's nonce is claimed in the same batch
(coordinator/shared_nonces.py), and a beat whose nonce another process claimed first
(a replay) changes nothing.
"""

from __future__ import annotations

import math
import threading
from typing import NamedTuple

from sqlalchemy import bindparam, case, update
from sqlalchemy.orm import Session

from coordinator.shared_nonces import Claim, SharedNonces
from coordinator.store import Lease, Worker


class Beat(NamedTuple):
    at: float
    round: int
    loss: float
    tokens_per_second: float
    nonce: bytes = b""  # claimed in the database when processes share it


class HeartbeatBuffer:
    def __init__(self, lease_max_seconds: float = math.inf, shared_nonces: SharedNonces | None = None) -> None:
        self._lease_max_seconds = lease_max_seconds
        self._shared_nonces = shared_nonces
        self._beats: dict[str, Beat] = {}  # the newest one of each worker counts
        self._claims: list[Claim] = []     # every beat's nonce, shared_nonces only
        self._writing = threading.local()  # each thread's transaction under way: what it took to write
        self._lock = threading.Lock()

    def record(self, worker_id: str, round_number: int, loss: float, tokens_per_second: float, now: float,
               nonce: bytes = b"", forget_nonce_at: float = 0.0) -> None:
        with self._lock:
            self._beats[worker_id] = Beat(now, round_number, loss, tokens_per_second, nonce)
            if self._shared_nonces is not None:
                self._claims.append((worker_id, nonce, forget_nonce_at))

    def write(self, session: Session, lease_seconds: float, now: float) -> int:
        """Write what was recorded, in the caller's transaction; returns how many workers were heard from.

        The caller ends with `written()` once the transaction committed, or `put_back()` if it failed.
        """
        with self._lock:
            beats, claims = self._beats, self._claims
            self._beats, self._claims = {}, []
        self._writing.taken = (beats, claims)
        if self._shared_nonces is not None:
            self._shared_nonces.forget_expired(session, now)
            fresh = self._shared_nonces.claim_many(session, claims)
            beats = {worker: beat for worker, beat in beats.items() if (worker, beat.nonce) in fresh}
        if not beats:
            return 0
        workers, leases = Worker.__table__.c, Lease.__table__.c
        session.execute(
            update(Worker.__table__).where(workers.id == bindparam("b_id")).values(
                # Two transactions writing beats may commit out of order: last seen never goes back.
                last_seen=case((workers.last_seen < bindparam("b_seen"), bindparam("b_seen")),
                               else_=workers.last_seen),
                tokens_per_second=bindparam("b_rate"),
                last_round=case((workers.last_round < bindparam("b_round"), bindparam("b_round")), else_=workers.last_round),
                last_loss=case((bindparam("b_loss") > 0, bindparam("b_loss")), else_=workers.last_loss),
            ),
            [{"b_id": w, "b_seen": b.at, "b_round": b.round, "b_loss": b.loss, "b_rate": b.tokens_per_second}
             for w, b in beats.items()],
        )
        deadline = bindparam("b_deadline")
        if math.isfinite(self._lease_max_seconds):
            hard_end = leases.granted_at + self._lease_max_seconds
            deadline = case((hard_end < deadline, hard_end), else_=deadline)
        session.execute(
            update(Lease.__table__).where(leases.worker_id == bindparam("b_id"), leases.state == "granted")
            .values(deadline=deadline),
            [{"b_id": w, "b_deadline": b.at + lease_seconds} for w, b in beats.items()],
        )
        return len(beats)

    def written(self) -> None:
        """The transaction that wrote the beats committed: forget them."""
        self._writing.taken = ({}, [])

    def put_back(self) -> None:
        """The transaction that was writing the beats failed: they wait for the next write (newer ones win)."""
        beats, claims = getattr(self._writing, "taken", ({}, []))
        self._writing.taken = ({}, [])
        with self._lock:
            for worker_id, beat in beats.items():
                if worker_id not in self._beats:
                    self._beats[worker_id] = beat
            self._claims[:0] = claims
