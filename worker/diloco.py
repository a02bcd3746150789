"""DiLoCo over hivemind: inner AdamW steps, then an outer Nesterov step on the averaged pseudo-gradient.

The pseudo-gradient is (global parameters - local parameters) after the inner steps.
Peers average it with hivemind's DecentralizedAverager, weighted by tokens trained,
and every peer applies the same outer SGD(nesterov) step to the same global
parameters, so peers that averaged together end the round with identical weights.
Groups are keyed by round number, so peers at different rounds never average
together; a peer that fell behind downloads the swarm's state (round, global
parameters, outer momentum) from a peer instead.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass

import torch
from hivemind import DHT
from hivemind.averaging import DecentralizedAverager

log = logging.getLogger("essaim.worker.diloco")


@dataclass(frozen=True)
class DiLoCoSettings:
    inner_lr: float
    outer_lr: float
    outer_momentum: float
    dht_prefix: str
    target_group_size: int
    matchmaking_seconds: float
    averaging_timeout_seconds: float


@dataclass(frozen=True)
class RoundResult:
    round: int               # the round whose outer step was just taken
    group_size: int          # peers averaged with, this one included (1: alone)
    pseudo_gradient_digest: str


class AveragingCancelled(Exception):
    pass


ROUND_BITS = 16  # rounds are told apart modulo 2**16 in group keys


class _StateSharingAverager(DecentralizedAverager):
    """An averager whose peers can download the trainer's outer state."""

    def __init__(self, trainer: "DiLoCoTrainer", *args: object, **kwargs: object) -> None:
        self._trainer = trainer
        super().__init__(*args, **kwargs)

    def get_current_state(self):  # type: ignore[no-untyped-def]
        return self._trainer.outer_state()


class DiLoCoTrainer:
    def __init__(self, model: torch.nn.Module, settings: DiLoCoSettings, dht: DHT) -> None:
        self.model = model
        self.settings = settings
        self.round = 0
        self._params = [p for p in model.parameters() if p.requires_grad]
        self.inner_optimizer = torch.optim.AdamW(self._params, lr=settings.inner_lr)
        self.global_params = [p.detach().clone() for p in self._params]
        self.outer_optimizer = torch.optim.SGD(
            self.global_params, lr=settings.outer_lr, momentum=settings.outer_momentum, nesterov=True
        )
        # Explicit zero buffers (what SGD would start from) so the state can be shared from round 0.
        self.momentum = [torch.zeros_like(p) for p in self.global_params]
        for param, buffer in zip(self.global_params, self.momentum):
            self.outer_optimizer.state[param]["momentum_buffer"] = buffer
        self._outer_lock = threading.Lock()  # peers read the outer state from another thread
        self.averager = _StateSharingAverager(
            self,
            # float64 on the wire: hivemind hands each peer (average - own part) to add to its
            # own part, which in float32 leaves peers a few ulps apart. In float64, rounding the
            # result back to float32 gives every peer the same bits (0 mismatches in 3e7 trials).
            [torch.zeros_like(p, dtype=torch.float64) for p in self._params],
            dht,
            prefix=f"{settings.dht_prefix}_pseudo_gradients",  # hivemind forbids "." in prefixes
            target_group_size=settings.target_group_size,
            min_matchmaking_time=settings.matchmaking_seconds,
            request_timeout=max(1.0, settings.matchmaking_seconds / 2),
            allreduce_timeout=settings.averaging_timeout_seconds,
            start=True,
        )

    def inner_step(self, input_ids: torch.Tensor) -> float:
        """One AdamW step on a batch of token rows; returns the loss."""
        self.model.train()
        loss = self.model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        self.inner_optimizer.step()
        self.inner_optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def outer_step(self, tokens_trained: int, cancel: threading.Event) -> RoundResult:
        """Average pseudo-gradients with the peers that are ready, then take the outer step."""
        pseudo_gradients = [g - p.detach() for g, p in zip(self.global_params, self._params)]
        group_size = self._average(pseudo_gradients, weight=float(max(tokens_trained, 1)), cancel=cancel)
        digest = hashlib.sha256()
        with self._outer_lock:
            for global_param, averaged in zip(self.global_params, pseudo_gradients):
                digest.update(averaged.numpy().tobytes())
                global_param.grad = averaged
            self.outer_optimizer.step()
            self.outer_optimizer.zero_grad(set_to_none=True)
            self._reset_local_params()
            result = RoundResult(round=self.round, group_size=group_size, pseudo_gradient_digest=digest.hexdigest())
            self.round += 1
        return result

    def outer_state(self) -> tuple[dict, list[torch.Tensor], None]:
        """(metadata, tensors, compression infos) as hivemind's state download expects."""
        with self._outer_lock:
            tensors = [t.detach().clone() for t in (*self.global_params, *self.momentum)]
            return {"round": self.round}, tensors, None

    def load_state_from_peers(self, timeout: float = 30.0) -> bool:
        """Adopt a peer's round, global parameters and outer momentum; False if no peer answered."""
        loaded = self.averager.load_state_from_peers(timeout=timeout)
        if loaded is None:
            return False
        metadata, tensors = loaded
        expected = len(self.global_params) + len(self.momentum)
        if not isinstance(metadata, dict) or len(tensors) != expected:
            log.warning("ignoring a peer state with %d tensors (expected %d)", len(tensors), expected)
            return False
        with self._outer_lock, torch.no_grad():
            for target, source in zip((*self.global_params, *self.momentum), tensors):
                target.copy_(source)
            self._reset_local_params()
            self.round = int(metadata["round"])
        log.info("loaded the swarm state of round %d from a peer", self.round)
        return True

    def _reset_local_params(self) -> None:
        with torch.no_grad():
            for param, global_param in zip(self._params, self.global_params):
                param.copy_(global_param)

    def _average(self, tensors: list[torch.Tensor], weight: float, cancel: threading.Event) -> int:
        """Replace `tensors` by the group's weighted average in place; returns the group size.

        When no group forms in time the worker keeps its own pseudo-gradient
        (a group of one) so training goes on; it is reported as group_size 1.
        """
        with self.averager.get_tensors() as shared:
            for slot, tensor in zip(shared, tensors):
                slot.copy_(tensor)
        self.averager.set_group_bits(format(self.round % 2**ROUND_BITS, f"0{ROUND_BITS}b"))
        control = self.averager.step(
            weight=weight, gather=self.round, timeout=self.settings.averaging_timeout_seconds, wait=False
        )
        while not control.done():
            if cancel.is_set():
                control.cancel()
                raise AveragingCancelled("stopped while averaging")
            time.sleep(0.05)
        try:
            gathered = control.result()
        except Exception as error:  # hivemind raises several kinds; all mean "no average this round"
            log.warning("round %d: averaging failed (%s); applying this worker's own pseudo-gradient", self.round, error)
            return 1
        rounds = set(gathered.values())
        if rounds != {self.round}:  # same key modulo 2**16 but another round: do not mix
            log.warning("round %d: a group formed with peers at rounds %s; not using it", self.round, sorted(rounds))
            return 1
        with self.averager.get_tensors() as shared:
            for tensor, slot in zip(tensors, shared):
                tensor.copy_(slot)
        return len(gathered)

    def shutdown(self) -> None:
        self.averager.shutdown()
