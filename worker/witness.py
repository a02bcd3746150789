"""What a reducer saw of each sender's part of its slice, and how a validator checks it against a replay.

A worker's claim about its round (its pseudo-gradient's digest and norm) says what it
trained, not what it averaged: a worker could train honestly and send something else.
The reducers are the only peers that see what each sender sent, a slice each, so each
writes down a small sketch of every sender's part of its slice and reports it with its
round: the part's norm and its dot products with PROJECTIONS pseudo-random sign vectors
(a Johnson-Lindenstrauss sketch). A validator that replays the sender's round computes
the same sketch of the replayed pseudo-gradient's slice and compares: the mean squared
difference of the projections estimates the squared distance between what was sent and
what the replay trained, so a scaled, sign-flipped, random, zeroed or other-data vector
shows up, while compression error and replay noise (a few percent) do not.

The sign of flat index i in projection j is a hash of (i, j, seed): any range of the
flattened pseudo-gradient is sketched without materialising the vectors, and a reducer's
parts (hivemind splits a slice into parts) add up to the slice's sketch. The seed is the
round: a sender knows the vectors in advance, so it could hide a perturbation orthogonal
to them within the tolerance; robust aggregation clips what it could gain that way.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

PROJECTIONS = 8
_MIX = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed 64-bit integer (Fibonacci hashing)
_STREAM = 0x632BE59BD9B4E019


def _signed64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


@functools.lru_cache(maxsize=2)
def _signs(start: int, end: int, seed: int) -> torch.Tensor:
    """+-1 (float64), PROJECTIONS x (end - start): the sign vectors over flat indexes [start, end) under `seed`.

    Cached: a reducer sketches the same part of every sender in turn.
    """
    index = torch.arange(start, end, dtype=torch.int64)
    rows = []
    for projection in range(PROJECTIONS):
        offset = _signed64((seed * PROJECTIONS + projection + 1) * _STREAM)
        x = (index + offset) * _MIX  # int64 wraps around: a 64-bit hash
        x = x ^ (x >> 29)
        x = x * _MIX
        rows.append(((x >> 40) & 1).to(torch.float64) * 2.0 - 1.0)
    return torch.stack(rows)


@dataclass
class Sketch:
    """A running sketch of one sender's part of a slice [start, end) of the flattened pseudo-gradient."""

    start: int
    end: int
    finite: bool = True
    sum_squares: float = 0.0
    projections: list[float] = field(default_factory=lambda: [0.0] * PROJECTIONS)

    @property
    def norm(self) -> float:
        return math.sqrt(self.sum_squares)

    def add(self, values: torch.Tensor, flat_start: int, seed: int) -> None:
        """Add the flat values [flat_start, flat_start + len) (a part of the slice)."""
        values = values.detach().reshape(-1).to(torch.float64)
        if not bool(torch.isfinite(values).all()):
            self.finite = False
            return
        self.sum_squares += float(values.dot(values))
        projected = _signs(flat_start, flat_start + values.numel(), seed) @ values
        self.projections = [total + float(value) for total, value in zip(self.projections, projected)]


def sketch(flat: torch.Tensor, start: int, end: int, seed: int, chunk: int = 1 << 18) -> Sketch:
    """The sketch of flat[start:end] (a validator's replay), a chunk at a time to bound memory."""
    result = Sketch(start, end)
    for first in range(start, end, chunk):
        last = min(first + chunk, end)
        result.add(flat[first:last], first, seed)
    return result


@dataclass(frozen=True)
class Comparison:
    distance: float    # estimated |sent - replayed| over the slice
    replayed_norm: float
    sent_norm: float

    @property
    def relative_distance(self) -> float:
        return self.distance / max(self.replayed_norm, 1e-30)

    @property
    def cosine(self) -> float:
        """Estimated cosine of what was sent with the replay (law of cosines on the sketch's distance)."""
        if self.sent_norm == 0.0 or self.replayed_norm == 0.0:
            return 0.0
        cosine = (self.sent_norm**2 + self.replayed_norm**2 - self.distance**2) / (2 * self.sent_norm * self.replayed_norm)
        return max(-1.0, min(1.0, cosine))


def compare(witnessed_norm: float, witnessed_projections: list[float], replayed: Sketch) -> Comparison:
    """How far what a reducer saw is from the replay's slice (both sketched with the same seed)."""
    squared = sum((a - b) ** 2 for a, b in zip(witnessed_projections, replayed.projections)) / PROJECTIONS
    return Comparison(math.sqrt(squared), replayed.norm, witnessed_norm)


def pooled(comparisons: list[Comparison]) -> Comparison:
    """Several slices' comparisons as one over their union: less noisy than any one (PROJECTIONS each)."""
    return Comparison(math.sqrt(sum(c.distance**2 for c in comparisons)),
                      math.sqrt(sum(c.replayed_norm**2 for c in comparisons)),
                      math.sqrt(sum(c.sent_norm**2 for c in comparisons)))
