"""The inner training step, written once: the trainer, calibration and the benchmark's worker side run this.

A step trains one batch of token rows, split into micro-batches of at most
`micro_batch_size` rows whose gradients accumulate, so a small GPU trains the
run's batch size in several passes. Every row has the same length (or the batch
is one short row), so weighting each micro-batch's mean loss by its share of the
rows gives the batch's mean loss: the same gradient, and the same tokens, as one pass.

The loss comes back as a tensor on the device: reading it (`float()`) waits for the
GPU, so callers add losses up on the device and read the sum once per round.
"""

from __future__ import annotations

import torch

from worker.device import DevicePlan


def inner_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor, plan: DevicePlan,
    micro_batch_size: int = 0,
) -> torch.Tensor:
    """One optimizer step on `batch` (rows x seq_len token ids, on the host); returns the detached mean loss."""
    rows = batch.shape[0]
    micro = micro_batch_size if 0 < micro_batch_size < rows else rows
    batch = plan.to_device(batch)
    total: torch.Tensor | None = None
    for first in range(0, rows, micro):
        chunk = batch[first : first + micro]  # (micro, seq_len)
        with plan.autocast():
            loss = model(input_ids=chunk, labels=chunk).loss  # float32 even under autocast
        if micro < rows:
            loss = loss * (chunk.shape[0] / rows)
        loss.backward()
        total = loss.detach() if total is None else total + loss.detach()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    assert total is not None
    return total


def inner_optimizer(params: list[torch.nn.Parameter], lr: float, plan: DevicePlan) -> torch.optim.AdamW:
    """AdamW on the device: fused (one kernel for every parameter) on CUDA, the default loop elsewhere."""
    return torch.optim.AdamW(params, lr=lr, fused=plan.is_cuda or None)


@torch.no_grad()
def probe_loss(model: torch.nn.Module, batch: torch.Tensor, plan: DevicePlan, micro_batch_size: int = 0) -> float:
    """The mean loss on `batch` without training: what a round's claim states before and after its inner steps.

    In eval mode (no dropout) and in the same passes as inner_step, so a validator's replay gets the same number.
    """
    rows = batch.shape[0]
    micro = micro_batch_size if 0 < micro_batch_size < rows else rows
    batch = plan.to_device(batch)
    was_training = model.training
    model.eval()
    try:
        total = 0.0
        for first in range(0, rows, micro):
            chunk = batch[first : first + micro]
            with plan.autocast():
                total += float(model(input_ids=chunk, labels=chunk).loss) * (chunk.shape[0] / rows)
        return total
    finally:
        model.train(was_training)
