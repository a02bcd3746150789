"""`essaim validator join`: replay other workers' sampled rounds and tell the coordinator whether they hold.

The coordinator samples reports to check (coordinator/verification.py); a validator, a
worker an admitted institution certified, takes one at a time (TakeCheck), replays it,
and sends a verdict (SubmitVerdict). The replay needs what the check names: the round's
start state (the parameters the round before kept), the report's leases, and the order in
which its inner steps took their batches (the claim's step schedule). With a fresh inner
AdamW every round (RunConfig.fresh_inner_optimizer), those determine the round's
pseudo-gradient. `judge` then compares (docs/ARCHITECTURE.md, "Checked work"):
- the claim: the same pseudo-gradient digest (an exact replay: same hardware, fp32), or
  else its norm and the probe batch's losses before and after within `Tolerances`;
- the witnesses: what the round's reducers saw the worker send, slice by slice
  (worker/witness.py), within a relative sketch distance of the replay. A worker that
  trains honestly but sends something else passes the claim and fails here. One reducer
  could lie about what it saw, so witnesses convict only when certified reducers' disagree,
  or volunteers' still do without the one that disagrees most.

The validator follows the run to have each round's start state when its checks come: it
downloads the swarm's state whenever the run moves to a new round, and keeps the last
few by their digest. It never averages, never holds a lease and never heartbeats (a live
worker without a lease would count as stake a round still waits for).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from model.checkpoints import tensors_digest
from model.presets import build_model
from protocol import essaim_pb2 as pb
from protocol.certificates import read_certificate
from protocol.choices import CERTIFIED_CLASSES
from protocol.credentials import CredentialCheck
from protocol.identity import Identity
from protocol.swarm import Swarm
from protocol.transport import ClientTLS
from worker.capabilities import detect
from worker.client import CoordinatorClient, CoordinatorRefused, CoordinatorUnreachable
from worker.data import batches
from worker.device import DevicePlan, plan_device
from worker.diloco import DiLoCoSettings, DiLoCoTrainer
from worker.governance import RunGovernance
from worker.shards import ShardStore, run_store
from worker.step import inner_optimizer, inner_step, probe_loss
from worker.witness import Comparison, compare, pooled, sketch

log = logging.getLogger("essaim.validator")

POLL_SECONDS = 0.5
FOLLOW_SECONDS = 0.2  # how often the follower asks for the run's round: a round's start state is there that long
KEPT_STATES = 8  # round start states kept: a check comes a round or more after its round starts


@dataclass(frozen=True)
class Tolerances:
    """How far a replay that is not bit-exact may be from a claim and from the witnesses, and still pass.

    Measured on CPU (benchmarks/byzantine.py), pooled over a round's slices: an honest sender's
    witnesses are within 0.03 % of its replay sent in fp16 and within 1 % in 8 bits; every attack
    the benchmark tries is 0.75 or more away.
    """

    sketch_distance: float = 0.3  # |sent - replayed| / |replayed| over the witnessed slices (estimated)
    norm: float = 0.05            # |claimed norm / replayed norm - 1|
    loss: float = 0.02            # |claimed probe loss / replayed - 1|, before and after the inner steps


@dataclass(frozen=True)
class Replay:
    """A round's inner steps done again: what the claim and the witnesses are compared with."""

    digest: str
    norm: float
    flat: torch.Tensor          # the pseudo-gradient, flattened (what witnesses index)
    loss_before: float
    loss_after: float
    consumed: dict[int, int]    # lease id -> tokens the step schedule takes from it


class ScheduleError(ValueError):
    """The claim's step schedule does not fit the report's leases."""


def replay_round(model: torch.nn.Module, start: list[torch.Tensor], leases: list[pb.Lease], step_leases: list[int],
                 reader: ShardStore, config: pb.RunConfig, plan: DevicePlan, micro_batch_size: int) -> Replay:
    """Train `model` from `start` on the leases' batches in the schedule's order, as the worker says it did."""
    params = [p for p in model.parameters() if p.requires_grad]
    if len(params) != len(start):
        raise ValueError(f"a start state of {len(start)} tensors for a model of {len(params)}")
    with torch.no_grad():
        for param, value in zip(params, start):
            param.copy_(value)
    model.train()
    optimizer = inner_optimizer(params, config.inner_lr, plan)
    by_id = {lease.lease_id: lease for lease in leases}
    streams = {lease_id: batches(reader.tokens(lease), config.batch_size, config.seq_len)
               for lease_id, lease in by_id.items()}
    consumed = dict.fromkeys(by_id, 0)
    probe: torch.Tensor | None = None
    loss_before = 0.0
    for lease_id in step_leases:
        if lease_id not in streams:
            raise ScheduleError(f"its step schedule takes a batch from lease {lease_id}, which the report does not name")
        batch = next(streams[lease_id], None)
        if batch is None:
            raise ScheduleError(f"its step schedule takes more batches from lease {lease_id} than it holds")
        consumed[lease_id] += batch.numel()
        if batch.shape[1] <= 1:
            continue  # a 1-token remainder: nothing to predict (as the worker does)
        if probe is None:
            probe, loss_before = batch, probe_loss(model, batch, plan, micro_batch_size)
        inner_step(model, optimizer, batch, plan, micro_batch_size)
    loss_after = probe_loss(model, probe, plan, micro_batch_size) if probe is not None else 0.0
    with torch.no_grad():
        pseudo = [value - param.detach().to("cpu", torch.float32) for value, param in zip(start, params)]
    flat = torch.cat([tensor.reshape(-1) for tensor in pseudo])
    return Replay(tensors_digest(pseudo), float(flat.double().norm()), flat, loss_before, loss_after, consumed)


def judge(check: pb.CheckAssignment, replay: Replay, tolerances: Tolerances = Tolerances()) -> pb.VerdictRequest:
    """The verdict on a check, from its replay (module docstring)."""
    verdict = pb.VerdictRequest(check_id=check.check_id)
    usage = {u.lease_id: u.tokens_consumed for u in check.usage}
    if usage != replay.consumed:
        return _failed(verdict, f"its step schedule trains {replay.consumed} tokens per lease, its report says {usage}")
    claim = check.claim
    claimed = (claim.pseudo_gradient_norm, claim.loss_before, claim.loss_after)
    if not all(math.isfinite(value) for value in claimed):  # NaN compares false with every tolerance
        return _failed(verdict, f"it claims non-finite numbers (norm, losses before and after: {claimed})")
    verdict.exact = claim.pseudo_gradient_digest == replay.digest
    verdict.norm_ratio = claim.pseudo_gradient_norm / replay.norm if replay.norm else math.inf
    if not verdict.exact:
        if abs(verdict.norm_ratio - 1.0) > tolerances.norm:
            return _failed(verdict, f"it claims a pseudo-gradient of norm {claim.pseudo_gradient_norm:.4g}; "
                                    f"the replay's is {replay.norm:.4g}")
        for name, claimed, replayed in (("before", claim.loss_before, replay.loss_before),
                                        ("after", claim.loss_after, replay.loss_after)):
            if abs(claimed - replayed) > tolerances.loss * max(abs(replayed), 1e-6):
                return _failed(verdict, f"it claims a probe loss of {claimed:.4f} {name} its inner steps; "
                                        f"the replay gets {replayed:.4f}")
    problem, doubt, cosine = _witnessed_problem(check, replay, tolerances)
    verdict.cosine = cosine if cosine is not None else (1.0 if verdict.exact else 0.0)
    if problem:
        return _failed(verdict, problem)
    if doubt:  # not enough to convict, and not to vouch for it either: its next rounds are checked again
        verdict.outcome = pb.VerdictRequest.INCONCLUSIVE
        verdict.reason = doubt
        return verdict
    verdict.outcome = pb.VerdictRequest.PASSED
    verdict.reason = "exact replay" if verdict.exact else "replay within tolerances"
    return verdict


def _witnessed_problem(check: pb.CheckAssignment, replay: Replay,
                       tolerances: Tolerances) -> tuple[str, str, float | None]:
    """What the reducers' witnesses say: why they convict the worker ("" if they do not), why they leave
    a doubt ("" if none), and the estimated cosine of what it sent with its replay.

    Each witness covers one reducer's slice; pooled over slices, the sketch's estimate is far less
    noisy than slice by slice. A certified reducer is believed; volunteers' witnesses convict only
    pooled without the one that disagrees most, so a single lying reducer cannot frame a worker.
    A lone volunteer's disagreement (the worker's group was small) leaves a doubt: no verdict.
    """
    certified: list[Comparison] = []
    volunteers: list[Comparison] = []
    not_finite = {"certified": 0, "volunteer": 0}
    for witness, reducer_class in zip(check.witnesses, _padded(check.witness_classes, len(check.witnesses))):
        kind = "certified" if reducer_class in CERTIFIED_CLASSES else "volunteer"
        if not witness.finite:
            not_finite[kind] += 1
            continue
        seen = compare(witness.norm, list(witness.projections), sketch(replay.flat, witness.start, witness.end,
                                                                       check.round))
        (certified if kind == "certified" else volunteers).append(seen)
    everything = certified + volunteers
    cosine = pooled(everything).cosine if everything else None
    if not_finite["certified"] or not_finite["volunteer"] >= 2:
        return f"{sum(not_finite.values())} reducer(s) saw it send NaN or infinity", "", cosine
    if certified and pooled(certified).relative_distance > tolerances.sketch_distance:
        distance = pooled(certified).relative_distance
        return f"certified reducers saw it send values {distance:.2f} of its replay's norm away from it", "", cosine
    if len(volunteers) >= 2:
        all_but_worst = sorted(volunteers, key=lambda c: c.distance)[:-1]
        distance = pooled(all_but_worst).relative_distance
        if distance > tolerances.sketch_distance:
            return (f"{len(volunteers)} reducers saw it send values {distance:.2f} of its replay's norm away from it "
                    f"(pooled over {len(all_but_worst)} slices, leaving out the most distant)"), "", cosine
    far = [c for c in volunteers if c.relative_distance > tolerances.sketch_distance]
    if not_finite["volunteer"] or far:
        return "", ("one volunteer reducer saw it send other values than it trained (NaN or "
                    f"{far[0].relative_distance if far else float('nan'):.2f} of its replay's norm away): "
                    "one word is not enough to convict nor to verify"), cosine
    return "", "", cosine


def _failed(verdict: pb.VerdictRequest, reason: str) -> pb.VerdictRequest:
    verdict.outcome = pb.VerdictRequest.FAILED
    verdict.reason = reason
    return verdict


def _padded(classes: list[str] | object, count: int) -> list[str]:
    listed = list(classes)  # type: ignore[call-overload]
    return listed + [""] * (count - len(listed))


class RoundStates:
    """The last few round start states, by the digest of their parameters."""

    def __init__(self, keep: int = KEPT_STATES) -> None:
        self._states: OrderedDict[str, list[torch.Tensor]] = OrderedDict()
        self._keep = keep
        self._lock = threading.Lock()  # the follower adds while checks read

    def add(self, params: list[torch.Tensor]) -> str:
        digest = tensors_digest(params)
        copies = [p.detach().clone() for p in params]
        with self._lock:
            self._states[digest] = copies
            self._states.move_to_end(digest)
            while len(self._states) > self._keep:
                self._states.popitem(last=False)
        return digest

    def get(self, digest: str) -> list[torch.Tensor] | None:
        with self._lock:
            return self._states.get(digest)


@dataclass(frozen=True)
class ValidatorOptions:
    coordinator: str
    identity_path: Path
    certificate: Path | None
    name: str = ""
    institution: str = "independent"
    trust_class: str = "institution"
    host: str = "127.0.0.1"
    tls: ClientTLS = ClientTLS()
    data_dir: Path | None = None
    cache_bytes: int = 10 << 30
    genesis: str = ""
    device: str = "cpu"            # an exact replay of CPU workers needs the CPU in fp32
    connect_seconds: float = 15.0


class Validator:
    def __init__(self, options: ValidatorOptions, tolerances: Tolerances = Tolerances()) -> None:
        self.options = options
        self.tolerances = tolerances
        self.stop_requested = threading.Event()
        self.identity = Identity.load_or_create(options.identity_path)
        self.client = CoordinatorClient(options.coordinator, self.identity, retry_seconds=options.connect_seconds,
                                        tls=options.tls)
        self.verdicts: dict[str, int] = {"passed": 0, "failed": 0, "inconclusive": 0}
        self.run_round = 0  # the run's current round, as the follower last read it

    def run(self) -> dict[str, int]:
        """Take, replay and judge checks until stopped or the run is complete; returns the verdicts' counts."""
        options = self.options
        plan = plan_device(options.device, "fp32")
        certificate = read_certificate(options.certificate, self.identity.public_key) if options.certificate else b""
        capabilities = detect(plan, options.trust_class, None, 0.0)
        self.client.register(options.name or "validator-" + self.identity.worker_id[:8], options.institution,
                             capabilities, certificate)
        config = self.client.run_config()
        governance = RunGovernance(config, options.genesis)
        reader, _, _ = run_store(config, options.data_dir, self.client, options.cache_bytes)
        states = RoundStates()
        replay_model = build_model(config.model_preset, config.vocab_size, config.seed).to(plan.device)
        follower_model = build_model(config.model_preset, config.vocab_size, config.seed)
        seed_digest = states.add([p for p in follower_model.parameters() if p.requires_grad])  # round 0's start
        swarm = Swarm(options.host, initial_peers=list(config.initial_peers), client_mode=True,
                      credentials=CredentialCheck(config.credential_key, config.run_id), dht_prefix=config.dht_prefix)
        # It only downloads states: no averaging, so no error-feedback buffers.
        follower = DiLoCoTrainer(follower_model, replace(DiLoCoSettings.for_run(config, 0), error_feedback=False),
                                 swarm.dht, plan)
        following = threading.Thread(target=self._follow, args=(follower, states), daemon=True)
        following.start()
        try:
            while not self.stop_requested.is_set():
                check = self.client.take_check()
                if not check.check_id:
                    if self.run_round >= config.total_rounds:
                        break  # the run is complete and every check of it is judged
                    self.stop_requested.wait(max(check.retry_after_ms / 1000, POLL_SECONDS))
                    continue
                start = states.get(check.start_params_digest or seed_digest)
                round_config = governance.round_config(config, check.round)
                self._submit(self._verdict(check, start, replay_model, reader, round_config, plan))
            return self.verdicts
        finally:
            self.stop_requested.set()
            following.join(timeout=15.0)
            follower.shutdown()
            reader.close()
            swarm.close()
            self.client.close()

    def _follow(self, follower: DiLoCoTrainer, states: RoundStates) -> None:
        """Download the swarm's state each time the run enters a round: the start state its checks will need."""
        while not self.stop_requested.wait(FOLLOW_SECONDS):
            try:
                self.run_round = self.client.status().current_round
            except (CoordinatorUnreachable, CoordinatorRefused) as error:
                log.warning("cannot read the run's round (%s); trying again", error)
                continue
            if self.run_round > follower.round and follower.load_state_from_peers(timeout=10.0):
                states.add(follower.global_params)

    def _verdict(self, check: pb.CheckAssignment, start: list[torch.Tensor] | None, model: torch.nn.Module,
                 reader: ShardStore, config: pb.RunConfig, plan: DevicePlan) -> pb.VerdictRequest:
        if start is None:
            return pb.VerdictRequest(check_id=check.check_id, outcome=pb.VerdictRequest.INCONCLUSIVE,
                                     reason=f"this validator has no state of round {check.round}'s start "
                                            f"({check.start_params_digest[:12]})")
        try:
            replay = replay_round(model, start, list(check.leases), list(check.claim.step_leases), reader, config,
                                  plan, check.claim.micro_batch_size)
        except ScheduleError as error:
            return _failed(pb.VerdictRequest(check_id=check.check_id), str(error))
        return judge(check, replay, self.tolerances)

    def _submit(self, verdict: pb.VerdictRequest) -> None:
        outcome = pb.VerdictRequest.Outcome.Name(verdict.outcome).lower()
        log.info("check %d: %s (%s)", verdict.check_id, outcome, verdict.reason)
        try:
            self.client.submit_verdict(verdict)
            self.verdicts[outcome] += 1
        except (CoordinatorRefused, CoordinatorUnreachable) as error:
            log.warning("check %d: the verdict was not taken (%s)", verdict.check_id, error)




def run_validator(options: ValidatorOptions) -> dict[str, int]:
    """Entry point for the CLI: its own process group (hivemind's children stop with it), SIGTERM stops it."""
    if os.getpid() != os.getpgid(0):
        os.setpgid(0, 0)
    validator = Validator(options)
    main_pid = os.getpid()

    def request_stop(signum: int, _frame: object) -> None:
        if os.getpid() == main_pid:
            validator.stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return validator.run()
