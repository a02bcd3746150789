"""Misbehaving on purpose: how tests and benchmarks put the network's defences against a real worker process.

`essaim worker join --adversary KIND` (a hidden option) makes a registered worker lie
with its tensors or its data the ways docs/ARCHITECTURE.md, "Checked work", defends
against. Every kind reports an honest-looking claim where it can, the hardest case for
a validator: what it sends is not what it trained, and only the reducers' witnesses
and a replay can tell.
- x100, sign_flip, random, nan: trains honestly, then sends its pseudo-gradient scaled
  by 100, negated, replaced by noise of the same norm, or full of NaN;
- zero: a free-rider: trains nothing, sends zeros, and reports its leases' tokens;
- wrong_shard: trains on another shard's tokens than its lease's.
An honest worker runs `Honest`, whose every method leaves things as they are.
"""

from __future__ import annotations

from typing import Sequence

import torch

from model.shards import ShardInfo
from protocol import essaim_pb2 as pb

ADVERSARIES = ("x100", "sign_flip", "random", "nan", "zero", "wrong_shard")


class Honest:
    kind = ""

    def trains(self) -> bool:
        """Whether the inner steps run at all."""
        return True

    def lease_to_read(self, lease: pb.Lease, shards: Sequence[ShardInfo]) -> pb.Lease:
        """The tokens it trains on for this lease (its own)."""
        return lease

    def sent_transform(self, pseudo_gradients: list[torch.Tensor]) -> None:
        """Change what it sends, in place (nothing)."""


class Adversary(Honest):
    def __init__(self, kind: str) -> None:
        if kind not in ADVERSARIES:
            raise ValueError(f"unknown adversary {kind!r}: use one of {', '.join(ADVERSARIES)}")
        self.kind = kind

    def trains(self) -> bool:
        return self.kind != "zero"

    def lease_to_read(self, lease: pb.Lease, shards: Sequence[ShardInfo]) -> pb.Lease:
        if self.kind != "wrong_shard":
            return lease
        for other in shards:  # the same range of another shard, if one is long enough
            if other.shard_id != lease.shard_id and other.tokens >= lease.end:
                swapped = pb.Lease()
                swapped.CopyFrom(lease)
                swapped.shard_id, swapped.shard_file, swapped.shard_sha256 = other.shard_id, other.file, other.sha256
                swapped.shard_tokens, swapped.dtype = other.tokens, other.dtype
                return swapped
        return lease

    def sent_transform(self, pseudo_gradients: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for tensor in pseudo_gradients:
                if self.kind == "x100":
                    tensor.mul_(100.0)
                elif self.kind == "sign_flip":
                    tensor.neg_()
                elif self.kind == "random":
                    noise = torch.randn_like(tensor)
                    tensor.copy_(noise * (tensor.norm() / noise.norm().clamp_min(1e-30)))
                elif self.kind == "nan":
                    tensor.fill_(float("nan"))
                elif self.kind == "zero":
                    tensor.zero_()


def adversary_for(kind: str) -> Honest:
    return Adversary(kind) if kind else Honest()
