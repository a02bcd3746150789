"""Replay protection across coordinator processes that share one database.

Each process's RequestVerifier (protocol/auth.py) remembers the nonces it saw; a request
replayed to another process would find that one's memory empty. So where several
processes serve one run (`coordinator serve --processes N`), every signed request's nonce
is also claimed in the database, inserted where the (worker, nonce) pair is the primary
key: the second claim of a nonce, in whichever process, inserts nothing and is refused.
A nonce is forgotten once its timestamp is no longer acceptable, as in memory.

Heartbeats, a thousand a second at 10,000 workers, claim theirs in the batch that writes
them (coordinator/heartbeats.py): a replayed heartbeat is answered, and changes nothing.
"""

from __future__ import annotations

from typing import Iterable

from sqlalchemy import delete
from sqlalchemy.orm import Session, sessionmaker

from coordinator.store import RequestNonce, insert_if_absent
from protocol.auth import AuthError

Claim = tuple[str, bytes, float]  # (worker id, nonce, when it may be forgotten)


class SharedNonces:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def claim(self, method: str, worker_id: str, nonce: bytes, forget_at: float) -> None:
        """Claim one request's nonce, in its own transaction; AuthError if any process claimed it before."""
        with self._sessions.begin() as session:
            if not self.claim_many(session, [(worker_id, nonce, forget_at)]):
                raise AuthError(f"{method}: replayed request (nonce already used by worker {worker_id}, "
                                "at another process of this coordinator)")

    @staticmethod
    def claim_many(session: Session, claims: Iterable[Claim]) -> set[tuple[str, bytes]]:
        """Claim nonces inside the caller's transaction; the (worker, nonce) pairs that were not claimed before."""
        rows = [{"worker_id": worker_id, "nonce": nonce, "forget_at": forget_at}
                for worker_id, nonce, forget_at in claims]
        if not rows:
            return set()
        statement = (insert_if_absent(session, RequestNonce.__table__, ["worker_id", "nonce"])
                     .returning(RequestNonce.worker_id, RequestNonce.nonce))
        claimed = set()
        for worker_id, nonce in session.execute(statement, rows):
            claimed.add((worker_id, bytes(nonce)))
        return claimed

    @staticmethod
    def forget_expired(session: Session, now: float) -> None:
        session.execute(delete(RequestNonce).where(RequestNonce.forget_at < now))
