"""How many tokens a worker's next lease may hold, and how long a failing worker waits.

A lease should be trainable within the worker's round: a fast HPC node and a slow
volunteer PC both finish their share when the round's time is up. It must never run
past the end of a Slurm allocation, and a worker whose leases keep expiring gets
smaller ones, after a growing pause, until one is reported again.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_BACKOFF_SECONDS = 300.0


@dataclass(frozen=True)
class LeasePolicy:
    lease_tokens: int            # the run's lease size: a share of a round's token budget
    leases_per_round: int
    round_seconds: float         # > 0: rounds end on time
    min_tokens: int              # one row of the model's context
    drain_seconds: float = 60.0  # the end of an allocation is for reporting and releasing, not training


@dataclass(frozen=True)
class WorkerFacts:
    tokens_per_second: float     # 0: not measured yet
    available_until: float       # unix seconds; 0: open-ended
    failures: int                # leases expired in a row


def lease_size(policy: LeasePolicy, worker: WorkerFacts, now: float) -> int | None:
    """Tokens for the worker's next lease; None when its allocation ends too soon to train one."""
    size = policy.lease_tokens
    rate = worker.tokens_per_second
    if policy.round_seconds > 0 and rate > 0:
        size = min(size, int(rate * policy.round_seconds / policy.leases_per_round))
    if worker.available_until > 0:
        remaining = worker.available_until - now - policy.drain_seconds
        if remaining <= 0 or (rate > 0 and rate * remaining < policy.min_tokens):
            return None
        if rate > 0:
            size = min(size, int(rate * remaining))
    size >>= min(worker.failures, 16)
    return max(size, policy.min_tokens)


def backoff_seconds(failures: int) -> float:
    """5 s after the first expired lease, doubling, at most five minutes."""
    return 0.0 if failures <= 0 else min(5.0 * 2 ** (failures - 1), MAX_BACKOFF_SECONDS)
