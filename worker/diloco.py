"""DiLoCo over hivemind: inner AdamW steps, then an outer Nesterov step on the averaged pseudo-gradient.

The pseudo-gradient is (global parameters - local parameters) after the inner steps.
Peers average it, weighted by tokens trained, with worker/allreduce.py (compressed
as the run says, and bit-identical on every peer of a group), and every peer
applies the same outer SGD(nesterov) step to the same global parameters, so peers
that averaged together end the round with identical weights. Groups are keyed by
round number, so peers at different rounds never average together; a peer that
fell behind downloads the swarm's state (round, global parameters, outer
momentum) from a peer instead, and keeps it only if its parameters are the ones
the coordinator recorded for the round (a `StateCheck`).

The model and inner AdamW live on the worker's device (worker/device.py) and train
with worker/step.py; the global parameters, the momentum and the outer step live on
the host in float32 (worker/outer_state.py), whatever the device and precision.

Checked work: each round reports the digest and norm of this peer's own pseudo-gradient
(what a validator replays from the round's start state; with fresh_inner_optimizer the
inner AdamW starts empty every round so the replay needs nothing else), and, when this
peer reduced a slice, a witness of what every sender sent for it (worker/witness.py).
The reducers combine the slices with the run's aggregation rule (worker/aggregation.py).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from hivemind import DHT
from hivemind.averaging.control import AveragingStage

from model.checkpoints import tensors_digest
from protocol import essaim_pb2 as pb
from protocol.dht_records import averaging_prefix, group_bits
from worker.aggregation import AGGREGATIONS, SenderWitness
from worker.allreduce import COMPRESSIONS, ExactAverager, GroupOutcome
from worker.peer_admission import GroupEntry, OpenAdmission
from worker.state_download import CheckedStateDownload, StateCheck
from worker.device import DevicePlan, plan_device
from worker.outer_state import OuterState
from worker.step import inner_optimizer, inner_step

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
    compression: str = "none"     # a key of worker.allreduce.COMPRESSIONS
    error_feedback: bool = False
    micro_batch_size: int = 0     # > 0: rows per forward/backward pass, gradients accumulated over the batch
    compile: bool = False         # torch.compile the model for the inner steps
    aggregation: str = "mean"     # how reducers combine slices: a key of worker.aggregation.AGGREGATIONS
    # Clear the inner AdamW state whenever the local parameters become the global ones, so a round's
    # inner steps depend only on its start state and batches: what a validator replays.
    fresh_inner_optimizer: bool = False

    @classmethod
    def for_run(cls, config: pb.RunConfig, micro_batch_size: int) -> "DiLoCoSettings":
        """The run's settings as its config states them (a governance vote changes some later, per round)."""
        return cls(
            inner_lr=config.inner_lr, outer_lr=config.outer_lr, outer_momentum=config.outer_momentum,
            dht_prefix=config.dht_prefix, target_group_size=config.target_group_size,
            matchmaking_seconds=config.matchmaking_seconds, averaging_timeout_seconds=config.averaging_timeout_seconds,
            compression=config.compression or "none", error_feedback=config.error_feedback,
            micro_batch_size=micro_batch_size, compile=config.compile, aggregation=config.aggregation or "mean",
            fresh_inner_optimizer=config.fresh_inner_optimizer,
        )


@dataclass(frozen=True)
class RoundResult:
    round: int               # the round whose outer step was just taken
    group_size: int          # peers averaged with, this one included (1: alone)
    pseudo_gradient_digest: str
    params_digest: str       # of the global parameters after the outer step
    bytes_sent: int          # averaging bytes this peer sent this round
    member_statements: list[bytes] = field(default_factory=list)  # the group's, ours included: they vouch
    local_digest: str = ""   # of this peer's own pseudo-gradient (global - local), before error feedback
    local_norm: float = 0.0  # its L2 norm
    witnesses: list[pb.SliceWitness] = field(default_factory=list)  # of the slice this peer reduced, if any


class AveragingCancelled(Exception):
    pass


class _StateSharingAverager(CheckedStateDownload, ExactAverager):
    """An averager whose peers can download the trainer's outer state."""

    def __init__(self, trainer: DiLoCoTrainer, *args: object, **kwargs: object) -> None:
        self._trainer = trainer
        super().__init__(*args, **kwargs)

    def get_current_state(self):  # type: ignore[no-untyped-def]
        return self._trainer.outer_state()


class DiLoCoTrainer:
    """The model and inner AdamW on the plan's device; the outer state on the host (worker/outer_state.py)."""

    def __init__(self, model: torch.nn.Module, settings: DiLoCoSettings, dht: DHT, plan: DevicePlan | None = None,
                 admission: OpenAdmission = OpenAdmission()) -> None:
        if settings.compression not in COMPRESSIONS:
            raise ValueError(f"unknown compression {settings.compression!r}: use one of {sorted(COMPRESSIONS)}")
        _check_aggregation(settings.aggregation)
        self.plan = plan or plan_device("cpu", "fp32")
        self.model = model.to(self.plan.device)
        # What the inner steps call: the same parameters, compiled into fused kernels if the run asks.
        self.forward_model = torch.compile(self.model) if settings.compile else self.model
        self.settings = settings
        self.compression = settings.compression  # in force; a governance vote may change it
        self.aggregation = settings.aggregation
        # An adversary's hook, for tests and benchmarks only: rewrites, in place, what this peer sends
        # (after error feedback, before averaging) while its report stays the honest one. Honest workers
        # never set it.
        self.sent_transform: Callable[[list[torch.Tensor]], None] | None = None
        self.round = 0
        self.round_started_at = time.time()  # wall clock, shared with peers that download our state
        self._handed_over_at = self.round_started_at  # overlapping: when the round now training began
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self.inner_optimizer = inner_optimizer(self._params, settings.inner_lr, self.plan)
        self.outer = OuterState(self._params, settings.outer_lr, settings.outer_momentum, self.plan)
        self._outer_lock = threading.Lock()  # peers read the outer state from another thread
        self.averager = _StateSharingAverager(
            self,
            [torch.zeros_like(p) for p in self.outer.global_params],
            dht,
            prefix=averaging_prefix(settings.dht_prefix),
            target_group_size=settings.target_group_size,
            min_matchmaking_time=settings.matchmaking_seconds,
            request_timeout=max(1.0, settings.matchmaking_seconds / 2),
            allreduce_timeout=settings.averaging_timeout_seconds,
            compression=settings.compression,
            aggregation=settings.aggregation,
            error_feedback=settings.error_feedback,
            admission=admission,
            start=True,
        )

    @property
    def global_params(self) -> list[torch.Tensor]:
        return self.outer.global_params

    @property
    def momentum(self) -> list[torch.Tensor]:
        return self.outer.momentum

    def inner_step(self, input_ids: torch.Tensor) -> torch.Tensor:
        """One AdamW step on a batch of token rows (on the host); returns the loss, on the device."""
        if not self.model.training:
            self.model.train()
        return inner_step(self.forward_model, self.inner_optimizer, input_ids, self.plan, self.settings.micro_batch_size)

    def expect_peers(self, live_workers: int) -> None:
        """Size averaging groups from the live membership: a full group starts at once."""
        self.averager.set_target_group_size(min(live_workers, self.settings.target_group_size))

    def outer_step(
        self,
        tokens_trained: int,
        cancel: threading.Event,
        apply_alone: Callable[[], bool] = lambda: True,
        give_up: Callable[[], bool] = lambda: False,
        entry: GroupEntry | None = None,
    ) -> RoundResult | None:
        """Average pseudo-gradients with the peers that are ready, then take the outer step.

        If no group forms (or give_up() turns true while still looking for one), the
        worker applies its own pseudo-gradient if apply_alone() says so; otherwise it
        takes no step, drops its inner progress and returns None, so that it can
        adopt the swarm's state instead. `entry` is what admits this peer to a group
        (its round credential and member statement; worker/peer_admission.py).
        """
        # The pseudo-gradient goes straight into the averager's shared buffers and is averaged there in
        # place, and the outer step reads it there: no copy of the model's size on the way in or out.
        local = self.take_round_progress()
        with self.averager.get_tensors() as pseudo_gradients:
            self._ready_to_send(pseudo_gradients)
        result = self._average_and_step(tokens_trained, cancel, apply_alone, give_up, entry, local, reset_local=True)
        if result is None:
            self.discard_local_progress()
        return result

    # -- overlapped averaging (RunConfig.overlap_averaging) --------------------------------------
    # Round m's average runs in the background while round m+1 trains, and its outer step lands one
    # round late. Peers still end each round with identical global parameters: the outer step is the
    # same one, it is only taken while the next round trains. The model itself is not the global
    # parameters: at each round's end it is rebased on the newest global ones plus its own progress.
    # A worker calls, at the end of round m's inner steps, with round m-1's average landed:
    # take_round_progress(), [catch up to the recorded state of round m, if it is behind], hand_over(),
    # then delayed_outer_step() in a background thread while round m+1 trains.

    def start_overlapping(self) -> None:
        self.outer.start_overlapping()

    def take_round_progress(self) -> tuple[str, float]:
        """This round's pseudo-gradient into the averager's buffers; its digest and norm (what a claim states)."""
        with self.averager.get_tensors() as pseudo_gradients:
            self.outer.pseudo_gradient(into=pseudo_gradients)
            return tensors_digest(pseudo_gradients), _norm(pseudo_gradients)

    def hand_over(self) -> None:
        """Overlapping: the model restarts from the global parameters plus this round's progress, and the
        pseudo-gradient is made ready to send. The last round's average must have landed (or been loaded)."""
        with self._outer_lock, self.averager.get_tensors() as pseudo_gradients:
            self.outer.rebase(pseudo_gradients)
            self._ready_to_send(pseudo_gradients)
        self._handed_over_at = time.time()  # the next round's inner steps start now

    def delayed_outer_step(self, tokens_trained: int, cancel: threading.Event, local: tuple[str, float],
                           apply_alone: Callable[[], bool] = lambda: True, give_up: Callable[[], bool] = lambda: False,
                           entry: GroupEntry | None = None) -> RoundResult | None:
        """Overlapping: average and step the global parameters, leaving the model (training the next round) alone.

        None: no group and not alone; the global parameters stay at this round's start, and the worker
        adopts the recorded state at its next round's end.
        """
        return self._average_and_step(tokens_trained, cancel, apply_alone, give_up, entry, local, reset_local=False)

    @contextmanager
    def global_params_in_model(self) -> Iterator[torch.nn.Module]:
        """Overlapping: the model holds the global parameters for a while (a checkpoint), then its own again."""
        own = [param.detach().clone() for param in self._params]
        with torch.no_grad():
            for param, global_param in zip(self._params, self.global_params):
                param.copy_(global_param)
        try:
            yield self.model
        finally:
            with torch.no_grad():
                for param, saved in zip(self._params, own):
                    param.copy_(saved)

    def _ready_to_send(self, pseudo_gradients: list[torch.Tensor]) -> None:
        """Error feedback: resend what compression dropped last round; and an adversary's rewrite, if any."""
        residuals = self.averager.residuals
        if residuals is not None:
            for gradient, residual in zip(pseudo_gradients, residuals):
                gradient.add_(residual)
                residual.zero_()
        if self.sent_transform is not None:
            self.sent_transform(pseudo_gradients)

    def _average_and_step(self, tokens_trained: int, cancel: threading.Event, apply_alone: Callable[[], bool],
                          give_up: Callable[[], bool], entry: GroupEntry | None, local: tuple[str, float],
                          reset_local: bool) -> RoundResult | None:
        residuals = self.averager.residuals
        bytes_before = self.averager.bytes_sent
        started = time.perf_counter()
        entry = entry or GroupEntry(self.round)
        group_size, statements, witnesses = self._average(float(max(tokens_trained, 1)), cancel, give_up, entry)
        self.outer.timings.average = time.perf_counter() - started
        if group_size == 1 and residuals is not None:
            for residual in residuals:  # not sent compressed: nothing to carry
                residual.zero_()
        if group_size == 1 and not apply_alone():
            return None
        with self._outer_lock, self.averager.get_tensors() as pseudo_gradients:
            self.outer.step(pseudo_gradients, reset_local=reset_local)
            result = RoundResult(
                round=self.round, group_size=group_size, pseudo_gradient_digest=tensors_digest(pseudo_gradients),
                params_digest=tensors_digest(self.global_params), bytes_sent=self.averager.bytes_sent - bytes_before,
                member_statements=statements, local_digest=local[0], local_norm=local[1], witnesses=witnesses,
            )
            self.round += 1
            # When the round these parameters start began training: now, or overlapping, at the hand-over
            # (the round has trained beside this average since). Peers that download the state share it.
            self.round_started_at = time.time() if reset_local else self._handed_over_at
            if reset_local:
                self._after_local_reset()
        self._offer_state()  # late joiners download the newest state first
        return result

    def _offer_state(self) -> None:
        """Rank our state by its round for peers that download one; a client-mode peer serves none."""
        if not self.averager.client_mode:
            self.averager.state_sharing_priority = self.round

    def stop_sharing_state(self) -> None:
        """Let peers download state from others: ours is about to be replaced."""
        self.averager.state_sharing_priority = 0

    def discard_local_progress(self) -> None:
        """Back to the global parameters: the inner steps since the last outer step are dropped."""
        with self._outer_lock:
            self.outer.reset_local()
            self._after_local_reset()

    def _after_local_reset(self) -> None:
        """The local parameters just became the global ones: with fresh_inner_optimizer, AdamW starts over too.

        AdamW builds its state lazily, step count included, so an empty state is a new optimizer.
        """
        if self.settings.fresh_inner_optimizer:
            self.inner_optimizer.state.clear()

    def outer_state(self) -> tuple[dict, list[torch.Tensor], None]:
        """(metadata, tensors, compression infos) as hivemind's state download expects."""
        with self._outer_lock:
            tensors = self.outer.state()
            return {"round": self.round, "round_started_at": self.round_started_at}, tensors, None

    def load_outer_state(self, round_number: int, tensors: list[torch.Tensor], round_started_at: float) -> None:
        """Adopt global parameters and outer momentum (from a peer or a checkpoint) at a round."""
        with self._outer_lock:
            self.outer.load(tensors)
            self.round, self.round_started_at = round_number, round_started_at
            self._after_local_reset()
        self._offer_state()

    def load_residuals(self, tensors: list[torch.Tensor]) -> None:
        """Take error-feedback residuals (from a checkpoint) into the averager's buffers, refusing any that do not fit."""
        residuals = self.averager.residuals
        if residuals is None:
            raise ValueError("this trainer runs without error feedback: it keeps no residuals")
        if [tuple(t.shape) for t in tensors] != [tuple(r.shape) for r in residuals]:
            raise ValueError(f"{len(tensors)} residuals that do not fit this model's {len(residuals)} tensors")
        with torch.no_grad():
            for residual, source in zip(residuals, tensors):
                residual.copy_(source)

    def load_state_from_peers(self, timeout: float = 30.0, check: StateCheck | None = None) -> bool:
        """Adopt a peer's round, global parameters and outer momentum; False if no peer answered.

        With a check, only a state at its round with its parameters (the coordinator's record) is taken.
        """
        loaded = self.averager.load_state_from_peers(timeout=timeout, check=check)
        if loaded is None:
            return False
        metadata, tensors = loaded
        try:
            self.load_outer_state(int(metadata["round"]), list(tensors), float(metadata["round_started_at"]))
        except (TypeError, KeyError, ValueError) as error:
            log.warning("ignoring a peer's state that does not fit this run (%s)", error)
            return False
        log.info("loaded the swarm state of round %d from a peer", self.round)
        return True

    def set_compression(self, name: str) -> None:
        """Average compressed this way from the next outer step on (a governance vote, at a round boundary).

        Peers of a group need not agree on it: each reducer's average goes out as one
        set of bytes that every peer decompresses alike, so parameters stay identical.
        """
        if name not in COMPRESSIONS:
            raise ValueError(f"unknown compression {name!r}: use one of {sorted(COMPRESSIONS)}")
        self.averager.set_compression(name)
        self.compression = name

    def set_aggregation(self, name: str) -> None:
        """Reduce the slices this peer reduces with this rule from the next outer step on (a governance vote).

        Only reducers apply it, each to its own slice, and every peer takes the reducer's bytes:
        peers that disagree on it mid-switch still end with identical parameters.
        """
        _check_aggregation(name)
        self.averager.set_aggregation(name)
        self.aggregation = name

    def set_learning_rates(self, inner_lr: float, outer_lr: float) -> None:
        """From the next step on (a governance vote changes them at a round boundary, on every worker alike)."""
        for group in self.inner_optimizer.param_groups:
            group["lr"] = inner_lr
        with self._outer_lock:
            self.outer.set_lr(outer_lr)

    def params_digest(self) -> str:
        with self._outer_lock:
            return tensors_digest(self.global_params)

    def _average(self, weight: float, cancel: threading.Event, give_up: Callable[[], bool],
                 entry: GroupEntry) -> tuple[int, list[bytes], list[pb.SliceWitness]]:
        """Replace the averager's tensors by the group's aggregate in place.

        Returns the group size, the members' statements (ours alone without a group) and
        this peer's witnesses as a reducer.

        When no group forms in time the worker keeps its own pseudo-gradient
        (a group of one) so training goes on; it is reported as group_size 1.
        A failed all-reduce leaves the tensors as they were (worker/allreduce.py).
        """
        alone: tuple[int, list[bytes], list[pb.SliceWitness]] = (1, [entry.statement] if entry.statement else [], [])
        self.averager.set_group_bits(group_bits(self.round))
        self.averager.set_round(self.round)
        control = self.averager.step(
            weight=weight, gather=entry.gathered(), timeout=self.settings.averaging_timeout_seconds, wait=False
        )
        while not control.done():
            if cancel.is_set():
                control.cancel()
                raise AveragingCancelled("stopped while averaging")
            if control.stage == AveragingStage.LOOKING_FOR_GROUP and give_up():
                control.cancel()  # the others averaged without us: waiting longer gains nothing
                log.warning("round %d: peers finished this round without this worker", self.round)
                return alone
            time.sleep(0.05)
        try:
            outcome: GroupOutcome = control.result()
        except Exception as error:  # hivemind raises several kinds; all mean "no average this round"
            log.warning("round %d: no averaging group (%s)", self.round, error)
            return alone
        # Every entry was checked, its round included, before the all-reduce (worker/peer_admission.py).
        entries = [GroupEntry.from_gathered(data) for data in outcome.gathered.values()]
        statements = [member.statement for member in entries if member.statement]
        return len(entries), statements, [_slice_witness(witness) for witness in outcome.witnesses]

    def shutdown(self) -> None:
        self.averager.shutdown()


def _check_aggregation(name: str) -> None:
    if name not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {name!r}: use one of {sorted(AGGREGATIONS)}")


def _norm(tensors: list[torch.Tensor]) -> float:
    """The L2 norm of the tensors as one vector, accumulated in float64 (what a validator recomputes)."""
    return math.sqrt(sum(float(t.detach().to(torch.float64).square().sum()) for t in tensors))


def _slice_witness(witness: SenderWitness) -> pb.SliceWitness:
    sketch = witness.sketch
    return pb.SliceWitness(
        sender_peer_id=witness.sender_peer_id, start=sketch.start, end=sketch.end, finite=sketch.finite,
        norm=sketch.norm, projections=sketch.projections, cosine_to_aggregate=witness.cosine_to_aggregate,
        median_norm=witness.median_norm,
    )
