"""Evaluating a model: its loss on fixed token rows, and on the corpus's held-out split per language and source.

Held-out figures (``evaluate_heldout``) are the mean loss in nats per predicted token
and the bits per byte, ``loss x tokens / (bytes x ln 2)``, where ``bytes`` are the UTF-8
bytes of the text the predicted tokens encode (model/text_bytes.py): bits per byte
compare across tokenizers, losses per token do not. Each source's held-out tokens are
cut into whole ``seq_len`` rows, at most ``max_tokens_per_source`` of them, read in shard
order: the cost is bounded and the same tokens are evaluated every time. A language's
and the overall figures pool their sources' tokens (so they weigh sources by the tokens
evaluated, not by the mixture's weights).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, ContextManager, Protocol

import numpy as np
import torch

from model.eval_figures import DEFAULT_MAX_TOKENS_PER_SOURCE, GROUPS, EvalFigure, bits_per_byte
from model.shards import Manifest, ShardInfo
from model.text_bytes import text_bytes


@torch.no_grad()
def mean_loss(model: torch.nn.Module, tokens: torch.Tensor, seq_len: int, batch_size: int = 8) -> float:
    """Average loss over the full seq_len rows of `tokens` (a 1-D tensor of token ids)."""
    rows = tokens[: tokens.numel() // seq_len * seq_len].view(-1, seq_len)
    if rows.shape[0] == 0:
        raise ValueError(f"need at least {seq_len} tokens to evaluate, got {tokens.numel()}")
    was_training = model.training
    model.eval()
    total = 0.0
    for first in range(0, rows.shape[0], batch_size):
        batch = rows[first : first + batch_size]
        total += float(model(input_ids=batch, labels=batch).loss) * batch.shape[0]
    model.train(was_training)
    return total / rows.shape[0]


@dataclass(frozen=True)
class HeldOutRows:
    """A source's held-out tokens to evaluate: whole rows, as a 1-D tensor."""

    source: str
    language: str
    tokens: torch.Tensor


class Placement(Protocol):
    """Where a model computes (worker.device.DevicePlan is one): batches go there, under its autocast."""

    def to_device(self, batch: torch.Tensor) -> torch.Tensor: ...

    def autocast(self) -> ContextManager[object]: ...


class OnHost:
    """The CPU in float32: the placement when none is given."""

    def to_device(self, batch: torch.Tensor) -> torch.Tensor:
        return batch

    def autocast(self) -> ContextManager[object]:
        return contextlib.nullcontext()


def heldout_rows(manifest: Manifest, read: Callable[[ShardInfo, int, int], torch.Tensor], seq_len: int,
                 max_tokens_per_source: int = DEFAULT_MAX_TOKENS_PER_SOURCE) -> list[HeldOutRows]:
    """Each source's first held-out tokens in whole ``seq_len`` rows, at most ``max_tokens_per_source``.

    ``read(shard, start, end)`` gives tokens [start, end) of a held-out shard, verified. A source with
    fewer held-out tokens than one row is left out.
    """
    if not manifest.heldout:
        raise ValueError("the corpus has no held-out split (prepared before there was one, or with "
                         "heldout_fraction = 0): re-run `essaim data prepare` to set one aside")
    if max_tokens_per_source < seq_len:
        raise ValueError(f"at most {max_tokens_per_source} tokens per source is less than one row of {seq_len}: "
                         "allow at least seq_len tokens")
    languages = {source.name: source.language for source in manifest.sources}
    budget = max_tokens_per_source // seq_len * seq_len
    rows = []
    for source in sorted({shard.source for shard in manifest.heldout}):
        parts, count = [], 0
        for shard in sorted((s for s in manifest.heldout if s.source == source), key=lambda s: s.shard_id):
            take = min(shard.tokens, budget - count)
            if take <= 0:
                break
            parts.append(read(shard, 0, take))
            count += take
        whole = count // seq_len * seq_len
        if whole:
            rows.append(HeldOutRows(source, languages[source], torch.cat(parts)[:whole]))
    return rows


@torch.no_grad()
def evaluate_heldout(model: torch.nn.Module, held_out: list[HeldOutRows], byte_lengths: np.ndarray, seq_len: int,
                     placement: Placement | None = None, batch_rows: int = 8) -> list[EvalFigure]:
    """The figures for all, each language and each source (in that order, names sorted).

    ``byte_lengths``: model.text_bytes.token_byte_lengths of the corpus's tokenizer.
    """
    placement = placement or OnHost()
    was_training = model.training
    model.eval()
    nats: dict[tuple[str, str], float] = defaultdict(float)
    tokens: dict[tuple[str, str], int] = defaultdict(int)
    bytes_: dict[tuple[str, str], int] = defaultdict(int)
    try:
        for part in held_out:
            rows = part.tokens.view(-1, seq_len)
            source_nats = 0.0
            for first in range(0, rows.shape[0], batch_rows):
                batch = rows[first : first + batch_rows]
                with placement.autocast():
                    loss = model(input_ids=placement.to_device(batch), labels=placement.to_device(batch)).loss
                source_nats += float(loss) * batch.shape[0] * (seq_len - 1)  # a mean over the batch's predictions
            predicted = rows[:, 1:].numpy()
            for key in (("all", "all"), ("language", part.language), ("source", part.source)):
                nats[key] += source_nats
                tokens[key] += predicted.size
                bytes_[key] += text_bytes(byte_lengths, predicted)
    finally:
        model.train(was_training)
    figures = []
    for group in GROUPS:
        for key in sorted(k for k in nats if k[0] == group):
            if not bytes_[key]:
                continue  # rows of document ends only: no text to count bits per byte of
            loss = nats[key] / tokens[key]
            figures.append(EvalFigure(group, key[1], tokens[key], bytes_[key], loss,
                                      bits_per_byte(loss, tokens[key], bytes_[key])))
    return figures
