"""Mean next-token loss of a model on fixed token rows: the same number for the same inputs."""

from __future__ import annotations

import torch


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
