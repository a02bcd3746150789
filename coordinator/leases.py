"""A lease's state changes, shared by the scheduler (grant, release, expiry) and the round book (reports).

granted --report--> reported --round decided--> completed (kept) | released (not kept)
granted --release/expiry--> released | expired
A reported lease waits for its round's decision: it neither expires nor can be released,
because its tokens may already be in the round's model.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from coordinator.store import Lease, TokenRange, count_assigned

HELD = ("granted", "reported")  # states in which a lease's range is out of the pool
HELD_SQL = ", ".join(f"'{state}'" for state in HELD)  # the same, for `state IN (...)` in plain SQL


class LeaseError(Exception):
    """A lease request or report that cannot be honoured; the message says why and what to do."""


def own_lease(session: Session, worker_id: str, lease_id: int, states: tuple[str, ...] = ("granted",)) -> Lease:
    """The worker's lease, locked, in one of `states`; LeaseError saying why not."""
    lease = session.get(Lease, lease_id, with_for_update=True)
    if lease is None:
        raise LeaseError(f"no lease {lease_id}: acquire a new lease")
    if lease.worker_id != worker_id:
        raise LeaseError(f"lease {lease_id} belongs to another worker")
    if lease.state not in states:
        if lease.state == "reported":
            raise LeaseError(f"lease {lease_id} is in a round report that awaits its round's decision: "
                             "send the same report again to learn the outcome")
        raise LeaseError(
            f"lease {lease_id} is {lease.state}, not granted (its deadline passed or it was "
            "already reported): acquire a new lease"
        )
    return lease


def return_to_pool(session: Session, lease: Lease, state: str, now: float) -> None:
    token_range = session.get(TokenRange, lease.range_id)
    token_range.state = "pool"
    count_assigned(session, token_range.source, -(token_range.end - token_range.start))
    lease.state, lease.finished_at = state, now


def complete(session: Session, lease: Lease, tokens_consumed: int, now: float) -> None:
    """The lease's first `tokens_consumed` tokens are trained; the rest of its range returns to the pool."""
    trained_end = lease.start + tokens_consumed
    token_range = session.get(TokenRange, lease.range_id)
    if trained_end < lease.end:
        token_range.end = trained_end
        session.add(token_range.piece(trained_end, lease.end, "pool"))
        count_assigned(session, token_range.source, -(lease.end - trained_end))
    token_range.state = "trained"
    lease.state, lease.finished_at, lease.tokens_consumed = "completed", now, tokens_consumed


def check_usage(lease: Lease, tokens_consumed: int) -> None:
    size = lease.end - lease.start
    if not 0 < tokens_consumed <= size:
        raise LeaseError(
            f"lease {lease.id} covers {size} tokens; tokens_consumed must be in 1..{size}, "
            f"got {tokens_consumed} (release the lease if nothing was trained)"
        )
