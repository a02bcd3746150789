"""What the scheduler applies at a round: lease sizes, source weights and the config version it records.

Without governance they are the run settings' throughout. With it, they follow the
ledger: a voted inner_steps resizes leases (a round's tokens are shared among
leases_per_round leases, as at the start), voted mixture weights reorder the
sources, and every lineage record names the accepted proposal in force at its
round, so a model card can say which configs trained the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

from coordinator.config import RunSettings
from coordinator.governed import GovernedRun
from coordinator.lease_sizing import LeasePolicy
from governance.state import UNGOVERNED_CONFIG_VERSION


@dataclass(frozen=True)
class RoundTerms:
    policy: LeasePolicy | None = None  # None: leases are bounded by what the worker asks for only
    mixture: dict[str, float] = field(default_factory=dict)  # voted source weights, over the corpus's
    config_version: str = UNGOVERNED_CONFIG_VERSION


def round_terms(run: RunSettings, governed: GovernedRun | None) -> Callable[[int], RoundTerms]:
    """The terms in force at a round; the ledger is read again at each call, so a vote applies from its round on."""
    policy = LeasePolicy(lease_tokens=run.lease_tokens, leases_per_round=run.leases_per_round,
                         round_seconds=run.round_seconds, min_tokens=run.seq_len)
    if governed is None:
        return lambda _round: RoundTerms(policy)

    def terms(round_: int) -> RoundTerms:
        state = governed.current().state
        inner_steps = state.config_at(round_).get("inner_steps", run.inner_steps)
        lease_tokens = run.model_copy(update={"inner_steps": inner_steps}).lease_tokens
        return RoundTerms(replace(policy, lease_tokens=lease_tokens), state.mixture_at(round_),
                          state.version_at(round_))

    return terms
