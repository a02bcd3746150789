"""Turning a lease's tokens into training batches (worker/shards.py reads and checks them)."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Iterator

import torch


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


def batches_when_fetched(tokens: Future[torch.Tensor], batch_size: int, seq_len: int) -> Iterator[torch.Tensor]:
    """``batches`` of tokens still being fetched: the first batch waits for them (and raises what the fetch raised)."""
    yield from batches(tokens.result(), batch_size, seq_len)
