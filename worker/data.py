"""Turning a lease into training batches, after checking the shard's integrity."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from model.shards import read_tokens, verify_shard
from protocol import essaim_pb2 as pb


class ShardReader:
    """Reads leased token ranges; hashes each shard file once per process, before first use."""

    def __init__(self, shard_dir: Path) -> None:
        self.shard_dir = shard_dir
        self._verified: set[tuple[str, str]] = set()

    def tokens(self, lease: pb.Lease) -> torch.Tensor:
        path = self.shard_dir / lease.shard_file
        key = (str(path), lease.shard_sha256)
        if key not in self._verified:
            verify_shard(path, lease.shard_sha256, lease.shard_tokens, lease.dtype)  # ShardIntegrityError
            self._verified.add(key)
        return torch.from_numpy(read_tokens(path, lease.dtype, lease.start, lease.end))


def batches(tokens: torch.Tensor, batch_size: int, seq_len: int) -> Iterator[torch.Tensor]:
    """Rows of seq_len tokens, batch_size rows at a time; a shorter last row is its own batch.

    Every token of the range lands in exactly one row, so "tokens consumed" is the
    whole range. A 1-token remainder has nothing to predict and is yielded anyway.
    """
    full_rows = tokens.numel() // seq_len
    rows = tokens[: full_rows * seq_len].view(full_rows, seq_len)
    for first in range(0, full_rows, batch_size):
        yield rows[first : first + batch_size]
    remainder = tokens[full_rows * seq_len :]
    if remainder.numel():
        yield remainder.view(1, -1)
