"""The data mixture: which source the next lease comes from.

Each source should get ``weight / sum(weights)`` of the leased tokens. Leasing
from the source with the fewest tokens per unit of weight so far keeps every
source within one lease of its share at any moment, so the trained proportions
converge to the targets as a run goes on.
"""

from __future__ import annotations


def mixture_order(weights: dict[str, float], assigned_tokens: dict[str, int]) -> list[str]:
    """Sources with a positive weight, the one furthest below its share first (ties: heavier, then name)."""
    return sorted(
        (source for source, weight in weights.items() if weight > 0),
        key=lambda source: (assigned_tokens.get(source, 0) / weights[source], -weights[source], source),
    )


def target_shares(weights: dict[str, float]) -> dict[str, float]:
    """Each source's target fraction of trained tokens."""
    total = sum(w for w in weights.values() if w > 0)
    return {source: (weight / total if weight > 0 else 0.0) for source, weight in weights.items()}
