"""Transactions that several coordinator processes run at once on one PostgreSQL database.

Two transactions that lock the same rows in different orders deadlock: PostgreSQL aborts
one (SQLSTATE 40P01); at a stricter isolation level it also aborts one of two that
conflict (40001). Either way the aborted one changed nothing, so it is run again, a few
times with a short random pause; a request whose transaction keeps losing is refused as
retryable (the worker's client retries UNAVAILABLE).
"""

from __future__ import annotations

import random
import time
from typing import Callable, TypeVar

from sqlalchemy.exc import DBAPIError

T = TypeVar("T")

RETRIED_STATES = {"40P01": "deadlock detected", "40001": "serialization failure"}
ATTEMPTS = 5


class DatabaseBusy(Exception):
    """A transaction aborted by the database every time it ran: the request may be sent again."""


def is_conflict(error: DBAPIError) -> bool:
    return getattr(error.orig, "sqlstate", None) in RETRIED_STATES


def retry_conflicts(attempt: Callable[[], T], on_abort: Callable[[], None] = lambda: None,
                    attempts: int = ATTEMPTS) -> T:
    """`attempt()` (one whole transaction), run again while the database aborts it for a conflict.

    `on_abort` runs after every failed attempt, whatever the error: it puts back what the
    transaction took from memory (the heartbeats it was writing).
    """
    for tries in range(1, attempts + 1):
        try:
            return attempt()
        except BaseException as error:
            on_abort()
            if not (isinstance(error, DBAPIError) and is_conflict(error)):
                raise
            if tries == attempts:
                raise DatabaseBusy(
                    f"the database aborted this request's transaction {attempts} times "
                    f"({RETRIED_STATES[error.orig.sqlstate]}: another coordinator process wanted the same "
                    "rows); send it again") from error
        time.sleep(random.uniform(0, 0.005 * 2 ** tries))  # apart, so that the two do not collide again
    raise AssertionError("unreachable")
