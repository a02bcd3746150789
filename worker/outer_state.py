"""The DiLoCo outer state in host memory: global parameters, outer Nesterov momentum, and the outer step.

As OpenDiLoCo and torchft do, this state stays off the GPU (pinned when the model
is on CUDA), so the device holds only the model, its gradients and AdamW. Each
round the local parameters come down once (device to host), the pseudo-gradient
(global - local) is taken here in float32, averaged, applied by SGD(nesterov) here,
and the new global parameters go back up once. The outer step never sees the
device or the autocast precision, so peers on a GPU in bf16 and on a CPU in fp32
that average the same pseudo-gradient end with the same bits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from worker.device import DevicePlan


@dataclass
class OuterTimings:
    """Seconds spent in each part of the last outer step (the benchmark prints them)."""

    device_to_host: float = 0.0
    pseudo_gradient: float = 0.0
    average: float = 0.0        # matchmaking, compression and all-reduce (hivemind's averager process)
    outer_step: float = 0.0
    host_to_device: float = 0.0


class OuterState:
    """Global parameters and outer momentum of `params` (the model's, on its device), kept on the host."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float, momentum: float, plan: DevicePlan) -> None:
        self.plan = plan
        self.local = params
        pin = plan.pin_host_memory
        self.global_params = [_host_copy(p.detach(), pin) for p in params]
        # Explicit zero buffers (what SGD would start from) so the state can be shared from round 0.
        self.momentum = [_host_zeros(p, pin) for p in self.global_params]
        self.optimizer = torch.optim.SGD(self.global_params, lr=lr, momentum=momentum, nesterov=True)
        for param, buffer in zip(self.global_params, self.momentum):
            self.optimizer.state[param]["momentum_buffer"] = buffer
        # Where the local parameters land on the host (a GPU's only; the CPU's are read where they are).
        self._staging = [_host_zeros(p, pin) for p in self.global_params] if plan.is_cuda else None
        self.timings = OuterTimings()
        # Overlapped averaging only (start_overlapping): where this round's inner steps began, which is
        # not the global parameters while the last round's average is still on its way.
        self.round_start: list[torch.Tensor] | None = None

    def start_overlapping(self) -> None:
        """Keep the round's start apart from the global parameters: one more host copy of the model."""
        self.round_start = [_host_copy(g, self.plan.pin_host_memory) for g in self.global_params]

    def pseudo_gradient(self, into: list[torch.Tensor]) -> None:
        """Write start - local, in float32 on the host, into `into` (the averager's buffers).

        The start is the global parameters, or, when overlapping, where the round's inner steps began.
        """
        started = time.perf_counter()
        with torch.no_grad():
            local = [param.detach() for param in self.local]
            if self._staging is not None:
                for staging, param in zip(self._staging, local):
                    staging.copy_(param, non_blocking=True)
                self.plan.synchronize()  # every copy has landed before the host reads them
                local = self._staging
            copied = time.perf_counter()
            start = self.round_start if self.round_start is not None else self.global_params
            for out, start_param, local_param in zip(into, start, local):
                torch.sub(start_param, local_param, out=out)
        self.timings.device_to_host = copied - started
        self.timings.pseudo_gradient = time.perf_counter() - copied

    def rebase(self, pseudo_gradient: list[torch.Tensor]) -> None:
        """Overlapping: the next round starts from the newest global parameters minus this round's
        pseudo-gradient, i.e. with this round's own progress on top of the swarm's last average."""
        assert self.round_start is not None, "rebase is for overlapped averaging"
        with torch.no_grad():
            for start, global_param, gradient in zip(self.round_start, self.global_params, pseudo_gradient):
                torch.sub(global_param, gradient, out=start)
            for param, start in zip(self.local, self.round_start):
                param.copy_(start, non_blocking=True)
        self.plan.synchronize()

    def step(self, averaged: list[torch.Tensor], reset_local: bool = True) -> None:
        """The outer Nesterov step on the averaged pseudo-gradient, then the model takes the new parameters
        (unless overlapping: the model is then training the next round, and is rebased at its end)."""
        started = time.perf_counter()
        for global_param, gradient in zip(self.global_params, averaged):
            global_param.grad = gradient
        self.optimizer.step()
        for global_param in self.global_params:
            global_param.grad = None
        self.timings.outer_step = time.perf_counter() - started
        if reset_local:
            self.reset_local()

    def reset_local(self) -> None:
        """The model's parameters become the global ones (after an outer step, or to drop inner progress)."""
        started = time.perf_counter()
        with torch.no_grad():
            for param, global_param in zip(self.local, self.global_params):
                param.copy_(global_param, non_blocking=True)
            if self.round_start is not None:
                for start, global_param in zip(self.round_start, self.global_params):
                    start.copy_(global_param)
        # Wait for the copies: the host may overwrite the global parameters next (a state download).
        self.plan.synchronize()
        self.timings.host_to_device = time.perf_counter() - started

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def load(self, tensors: list[torch.Tensor]) -> None:
        """Adopt global parameters then momentum (as state() lists them), refusing any that do not fit."""
        targets = (*self.global_params, *self.momentum)
        if len(tensors) != len(targets):
            raise ValueError(f"an outer state with {len(tensors)} tensors; this model needs {len(targets)}")
        for target, source in zip(targets, tensors):
            if target.shape != source.shape:
                raise ValueError(f"an outer state tensor of shape {tuple(source.shape)}, not {tuple(target.shape)}")
        with torch.no_grad():
            for target, source in zip(targets, tensors):
                target.copy_(source)
        self.reset_local()

    def state(self) -> list[torch.Tensor]:
        """Copies of the global parameters then the momentum, for a peer or a checkpoint."""
        return [t.detach().clone() for t in (*self.global_params, *self.momentum)]


def _host_copy(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    copy = _host_zeros(tensor, pin)
    copy.copy_(tensor)
    return copy


def _host_zeros(like: torch.Tensor, pin: bool) -> torch.Tensor:
    return torch.zeros(like.shape, dtype=torch.float32, device="cpu", pin_memory=pin)
