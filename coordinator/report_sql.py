"""A round report's reads in plain SQL, on the connection of the scheduler's transaction.

Every report asks whether its round is decided (coordinator/rounds.py), 167 times a second
at 10,000 workers: as ORM expressions these reads cost about 250 us of Python each, as
text about 20 us (coordinator/grant_sql.py says the same of grants). The ORM still
loads and changes the rows that a report records.
"""

from __future__ import annotations

from sqlalchemy import Connection, bindparam, text

from coordinator.leases import HELD_SQL

QUARANTINED = text("SELECT quarantined_at IS NOT NULL FROM workers WHERE id = :worker")
PEER_ID = text("SELECT peer_id FROM workers WHERE id = :worker")
FILED_REPORT = text("SELECT id FROM round_reports WHERE round = :round AND worker_id = :worker")
COMPLETED_LEASES = text(
    "SELECT count(id) FROM leases WHERE id IN :ids AND state = 'completed' AND worker_id = :worker AND round = :round"
).bindparams(bindparam("ids", expanding=True))
PENDING_STAKES = text("SELECT params_digest, sum(held_tokens), min(received_at) FROM round_reports "
                      "WHERE round = :round AND outcome = 'pending' GROUP BY params_digest")
GRANTED_TOKENS = text("SELECT coalesce(sum(\"end\" - start), 0) FROM leases WHERE round = :round AND state = 'granted'")
# Correlated (NOT EXISTS), each worker looked up in the indexes: it stops at the `at_most`-th idle
# worker, where NOT IN would first list every lease and report of the round.
IDLE_WORKERS = text(
    "SELECT count(*) FROM (SELECT w.id FROM workers w WHERE w.last_seen >= :live_since AND w.last_round >= :round "
    "AND w.quarantined_at IS NULL "
    f"AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.worker_id = w.id AND l.state IN ({HELD_SQL}) "
    "AND l.round >= :round) "
    "AND NOT EXISTS (SELECT 1 FROM round_reports r WHERE r.round = :round AND r.worker_id = w.id) "
    "LIMIT :at_most) AS idle")
LINEAGE_HEAD = text("SELECT max(id) FROM lineage")


def is_quarantined(db: Connection, worker_id: str) -> bool:
    return bool(db.execute(QUARANTINED, {"worker": worker_id}).scalar())


# PostgreSQL: one transaction decides a round at a time; the others do not queue behind its locks.
TRY_DECISION_LOCK = text("SELECT pg_try_advisory_xact_lock(:key)")
DECISION_LOCK_SPACE = 0x65737361 << 32  # "essa": advisory lock keys of round decisions, one per round


def take_decision(db: Connection, round_number: int) -> bool:
    """True if this transaction may decide the round (until it ends); False while another one is deciding it.

    A decision records every kept report, seconds of work in a round of thousands: reports that arrive
    meanwhile would each wait for its locks, and hold a server thread, only to find the round decided.
    They stay pending instead, and their next try is answered. SQLite: the scheduler's lock does this.
    """
    if db.dialect.name != "postgresql":
        return True
    return bool(db.execute(TRY_DECISION_LOCK, {"key": DECISION_LOCK_SPACE + round_number}).scalar())
