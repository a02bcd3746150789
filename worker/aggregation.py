"""How a reducer combines the senders' parts of its slice: the run's aggregation rule.

Each rule takes every sender's part of one slice (same shape, float32) and its weight
(tokens trained, already capped at the sender's credential) and returns the slice's
aggregate. Only the reducer computes it; every peer then decompresses the same bytes
(worker/allreduce.py), so a rule needs to be deterministic, not symmetric across peers.

Why each rule is there, for one bad sender among a few:
- every rule drops a part holding a NaN or an infinity before anything else: one such
  value would otherwise spread to every coordinate of the outer step, on every peer;
- "mean", the weighted mean, is hivemind's average: exact, and the right rule when every
  sender is trusted; one part scaled x100, or a random vector of large norm, moves it
  as far as the attacker likes;
- "clipped_mean" scales every part whose norm exceeds CLIP_MULTIPLE x the median norm
  down to that bound, then takes the weighted mean: a x100 or large random part weighs at
  most as much as an honest part a little larger than usual, while honest parts (whose
  norms are alike) pass untouched, so it costs nothing when nobody cheats;
- "trimmed_mean" drops, coordinate by coordinate, the largest and smallest values before
  the weighted mean: a minority of outliers in any direction (a sign flip, which clipping
  cannot see since it keeps the norm, or a x100 part) never reaches the average.
A zeroed part (a free rider) has a small norm and passes every rule; it only dilutes the
average, like a peer that trained little. Catching it is the validators' job (worker/witness.py).

RobustPartReducer applies a rule inside hivemind's all-reduce (worker/allreduce.py), part by
part of the slice a peer reduces, and writes down a witness of every sender's part on the way.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer
from hivemind.utils import get_logger

from protocol.choices import AGGREGATIONS as AGGREGATION_NAMES
from worker.witness import Sketch

logger = get_logger(__name__)

# A part may be this many times the median part norm before it is scaled down.
CLIP_MULTIPLE = 2.0
# The share of values dropped at each end of every coordinate by the trimmed mean.
TRIM_FRACTION = 0.25

Rule = Callable[[Sequence[torch.Tensor], Sequence[float]], torch.Tensor]


def admissible(parts: Sequence[torch.Tensor], weights: Sequence[float]) -> tuple[list[torch.Tensor], list[float]]:
    """The parts that may enter an average: finite everywhere, with a positive weight.

    A zero weight says "count me for nothing"; kept, it would still move the robust rules'
    order statistics (the median norm, the trimmed values).
    """
    kept = [(part, float(weight)) for part, weight in zip(parts, weights)
            if weight > 0 and bool(torch.isfinite(part).all())]
    return [part for part, _ in kept], [weight for _, weight in kept]


def median_norm(norms: Sequence[float]) -> float:
    """The lower median: with an even count, the smaller of the two middle values.

    The upper one would let half of the senders (two of four) set the bound on their own.
    """
    if not norms:
        return 0.0
    return sorted(norms)[(len(norms) - 1) // 2]


def weighted_mean(parts: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum(weight * part) / sum(weight), accumulated in sender order (as hivemind's reducer, but in a fixed order)."""
    total = torch.zeros_like(parts[0], dtype=torch.float32)
    for part, weight in zip(parts, weights):
        total.add_(part, alpha=weight)
    return total.div_(sum(weights))


def mean(parts: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    finite, kept_weights = admissible(parts, weights)
    if not finite:
        return torch.zeros_like(parts[0], dtype=torch.float32)
    return weighted_mean(finite, kept_weights)


def clipped_mean(parts: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    finite, kept_weights = admissible(parts, weights)
    if not finite:
        return torch.zeros_like(parts[0], dtype=torch.float32)
    norms = [float(part.norm(dtype=torch.float64)) for part in finite]
    bound = CLIP_MULTIPLE * median_norm(norms)
    if bound > 0.0:  # a zero median (most parts zero) gives no scale to clip to
        finite = [part * (bound / norm) if norm > bound else part for part, norm in zip(finite, norms)]
    return weighted_mean(finite, kept_weights)


def trimmed_count(senders: int) -> int:
    """How many values to drop at each end of a coordinate among `senders` values.

    floor(TRIM_FRACTION x senders), but at least one as soon as one is left in the middle
    (3 senders: the coordinate-wise median), since a group of 3 needs protection as much as
    one of 4. With 1 or 2 senders nothing can be told apart: nothing is dropped.
    """
    if senders < 3:
        return 0
    return max(1, int(TRIM_FRACTION * senders))


def trimmed_mean(parts: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    finite, kept_weights = admissible(parts, weights)
    if not finite:
        return torch.zeros_like(parts[0], dtype=torch.float32)
    trim = trimmed_count(len(finite))
    if trim == 0:
        return weighted_mean(finite, kept_weights)
    stacked = torch.stack([part.to(torch.float32) for part in finite])  # (senders, *shape)
    # Stable: equal values keep sender order, so the same inputs always pick the same weights.
    ordered, order = torch.sort(stacked, dim=0, stable=True)
    ordered_weights = torch.tensor(kept_weights, dtype=torch.float32)[order]
    middle = slice(trim, len(finite) - trim)
    kept_values, kept_weights_by_value = ordered[middle], ordered_weights[middle]
    return (kept_values * kept_weights_by_value).sum(dim=0) / kept_weights_by_value.sum(dim=0)


AGGREGATIONS: dict[str, Rule] = {"mean": mean, "clipped_mean": clipped_mean, "trimmed_mean": trimmed_mean}
assert tuple(AGGREGATIONS) == AGGREGATION_NAMES, "worker/aggregation.py and protocol/choices.py name different rules"


@dataclass(frozen=True)
class SenderWitness:
    """What this peer, as a reducer, saw of one sender's part of its slice (picklable: it crosses processes)."""

    sender_peer_id: str          # base58
    sketch: Sketch               # over [sketch.start, sketch.end) of the flattened tensors, seeded by the round
    cosine_to_aggregate: float   # of its part with the slice's aggregate (0 when either is zero or not finite)
    median_norm: float           # of every finite sender's part of the slice (worker.aggregation.median_norm)


class RobustPartReducer(TensorPartReducer):
    """hivemind's reducer of one peer's slice, combining each part with an aggregation rule instead of a running sum.

    For the current part it keeps every sender's (part, weight); once every sender still in
    has sent it, the rule combines them in sender order (off the event loop), and each sender's
    part is added to its witness. Failure handling is hivemind's: a banned sender's later parts
    are left out, and a finalized reducer wakes whoever still waits.
    """

    def __init__(self, part_shapes: Sequence[torch.Size], num_senders: int, *, rule: Rule,
                 flat_starts: Sequence[int], seed: int) -> None:
        self._rule = rule
        self._flat_starts = list(flat_starts)  # where each part begins in the flattened tensors
        self._seed = seed
        self._received: dict[int, tuple[torch.Tensor, float]] = {}  # sender index -> its current part and weight
        self._finishing: asyncio.Task | None = None
        end = self._flat_starts[-1] + math.prod(part_shapes[-1]) if part_shapes else 0
        start = self._flat_starts[0] if part_shapes else 0
        self._sketches = [Sketch(start, end) for _ in range(num_senders)]
        self._dots = [0.0] * num_senders                 # sum over its parts of <part, aggregate>
        self._aggregate_squares = [0.0] * num_senders    # sum over the same parts of |aggregate|^2
        self._witnessed: set[int] = set()                # senders with at least one part aggregated
        super().__init__(part_shapes, num_senders)

    async def accumulate_part(self, sender_index: int, part_index: int, tensor_part: torch.Tensor,
                              weight: float = 1.0) -> torch.Tensor:
        """Hand in a sender's part, wait until every sender's is in, return the part's aggregate."""
        assert 0 <= sender_index < self.num_senders, "invalid sender index"
        assert 0 <= part_index < self.num_parts, "invalid part index"
        self.num_parts_received[sender_index] += 1
        while part_index > self.current_part_index:  # earlier parts are still being combined
            finished = asyncio.create_task(self.finished.wait())
            await asyncio.wait({self.current_part_future, finished}, return_when=asyncio.FIRST_COMPLETED)
            finished.cancel()
            if self.finished.is_set():
                raise AllreduceException(f"attempted to aggregate part in a finalized {type(self).__name__}")
        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        assert part_index == self.current_part_index
        current_part_future = self.current_part_future
        self._received[sender_index] = (tensor_part, weight)
        self.current_part_accumulated_from += 1
        self.check_current_part_finished()
        return await current_part_future

    def reset_accumulators(self) -> None:
        super().reset_accumulators()
        self._received = {}

    def check_current_part_finished(self) -> None:
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from == self.num_current_senders and self._finishing is None:
            self._finishing = asyncio.get_running_loop().create_task(self._finish_current_part())

    async def _finish_current_part(self) -> None:
        part_index, received = self.current_part_index, sorted(self._received.items(), key=lambda item: item[0])
        try:
            aggregate = await asyncio.get_running_loop().run_in_executor(None, self._combine, part_index, received)
        except Exception as error:  # a bug here must fail the all-reduce, not hang it until the timeout
            logger.exception(error)
            if not self.finished.is_set():
                self.current_part_future.set_exception(error)
                self.finalize()
            return
        finally:
            self._finishing = None
        if self.finished.is_set():  # the all-reduce ended while we computed
            return
        self.current_part_future.set_result(aggregate)
        self.reset_accumulators()

    def _combine(self, part_index: int, received: list[tuple[int, tuple[torch.Tensor, float]]]) -> torch.Tensor:
        """The rule's aggregate of the senders' parts (in sender order), and their witnesses (an executor thread)."""
        parts = [part for _, (part, _) in received]
        weights = [weight for _, (_, weight) in received]
        aggregate = self._rule(parts, weights) if parts else torch.zeros(self.part_shapes[part_index])
        aggregate64 = aggregate.to(torch.float64)
        aggregate_squares = float(aggregate64.dot(aggregate64))
        for sender, part in zip((index for index, _ in received), parts):
            self._witnessed.add(sender)
            self._sketches[sender].add(part, self._flat_starts[part_index], self._seed)
            if self._sketches[sender].finite:
                self._dots[sender] += float(part.to(torch.float64).dot(aggregate64))
                self._aggregate_squares[sender] += aggregate_squares
        return aggregate

    def witnesses(self, sender_peer_ids: Sequence[str]) -> list[SenderWitness]:
        """A witness per sender with a part aggregated here, in sender order (none if this peer reduced nothing)."""
        witnessed = sorted(self._witnessed)
        median = median_norm([self._sketches[i].norm for i in witnessed if self._sketches[i].finite])
        return [SenderWitness(sender_peer_ids[i], self._sketches[i], self._cosine(i), median) for i in witnessed]

    def _cosine(self, sender: int) -> float:
        scale = self._sketches[sender].norm * math.sqrt(self._aggregate_squares[sender])
        return self._dots[sender] / scale if self._sketches[sender].finite and scale > 0.0 else 0.0
