"""What one round has trained so far, and how a round can end early (the worker's round loop)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from protocol import essaim_pb2 as pb


@dataclass
class RoundProgress:
    """What one round has trained so far."""

    leases: list[pb.Lease] = field(default_factory=list)
    consumed: dict[int, int] = field(default_factory=dict)  # lease id -> tokens trained (a prefix)
    tokens: int = 0
    loss_sum: torch.Tensor | None = None  # on the device: read once, at the end of the round
    steps: int = 0
    inner_seconds: float = 0.0
    credential: bytes = b""  # the newest lease's round credential: what admits us to the round's group
    # What the round's claim states (WorkClaim): a validator replays the round against it.
    step_leases: list[int] = field(default_factory=list)  # the lease of each batch taken, in order
    probe: torch.Tensor | None = None  # the round's first batch: the claim's losses are measured on it
    loss_before: float = 0.0

    def add_loss(self, loss: torch.Tensor) -> None:
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.steps += 1

    def mean_loss(self) -> float:
        return float(self.loss_sum) / self.steps if self.steps else 0.0

    def unused_leases(self) -> list[pb.Lease]:
        return [lease for lease in self.leases if lease.lease_id not in self.consumed]

    def used_leases(self) -> list[pb.Lease]:
        """The leases it trained on: the others were given back before averaging."""
        return [lease for lease in self.leases if lease.lease_id in self.consumed]


class RoundOver(Exception):
    """The coordinator decided this worker's round without it: adopt the swarm's state."""


class RoundNotOpen(Exception):
    """Overlapped averaging: nobody trains the round after the open one yet; train the open round."""
