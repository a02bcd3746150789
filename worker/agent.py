"""`essaim worker join`: register, then lease -> train -> average -> report, until the run ends.

Before it registers, the worker settles its device and precision (worker/device.py)
and checks that the run's model fits there (worker/memory.py), so a worker that
cannot train is refused before it holds any lease.

The worker makes itself a process-group leader so that its supervisor (the demo,
Slurm, a test) can stop the agent and every hivemind child with one signal. On
SIGTERM or SIGINT it gives its leases back, saves a checkpoint if it keeps any,
and shuts hivemind down before exiting.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from model.checkpoints import Checkpoint, CheckpointError, latest_checkpoint, load_model, read_checkpoint
from model.presets import build_model
from protocol import essaim_pb2 as pb
from protocol.certificates import read_certificate
from protocol.credentials import CredentialCheck
from protocol.identity import Identity
from protocol.swarm import Swarm, free_port
from protocol.transport import ClientTLS
from worker.adversary import adversary_for
from worker.capabilities import calibrate, detect
from worker.checkpoint import restore_outer_state, save_checkpoint
from worker.client import CoordinatorClient, CoordinatorRefused, CoordinatorUnreachable
from worker.data import batches_when_fetched
from worker.device import plan_device
from worker.diloco import AveragingCancelled, DiLoCoSettings, DiLoCoTrainer, RoundResult
from worker.energy import EnergyMeter
from worker.evaluation import RoundEvaluator
from worker.governance import RunGovernance
from worker.memory import Workload, check_fits, out_of_memory_refused
from worker.metrics import RoundFigures, WorkerMetrics
from worker.overlapped import OverlappedRounds
from worker.peer_admission import CredentialAdmission, GroupEntry
from worker.reachability import ReachabilityCheck
from worker.round_progress import RoundNotOpen, RoundOver, RoundProgress
from worker.shards import ShardStore, run_store
from worker.state_download import StateCheck
from worker.step import probe_loss

log = logging.getLogger("essaim.worker")

POOL_EMPTY_WAIT_SECONDS = 1.0
QUARANTINED_EXIT = 3  # the coordinator refuses this worker's work: a supervisor should not just restart it


@dataclass(frozen=True)
class WorkerOptions:
    coordinator: str
    identity_path: Path
    name: str = ""
    institution: str = "independent"     # claimed; credited only as `certificate` says
    host: str = "127.0.0.1"               # what the hivemind peer binds (0.0.0.0: every interface)
    announce: str = ""                    # what peers dial, when not `host` (default with 0.0.0.0: as the coordinator sees us)
    dht_port: int = 0                     # 0: a free port
    client_mode: bool = False             # average without accepting connections (also chosen when unreachable)
    tls: ClientTLS = ClientTLS()          # how the coordinator is authenticated off loopback
    data_dir: Path | None = None          # default: the coordinator's directory if visible here, else ~/.essaim/data/<run>
    cache_bytes: int = 10 << 30           # most bytes of fetched chunks kept in data_dir; 0: no cap
    checkpoint_dir: Path | None = None    # where to save the final model, if anywhere
    connect_seconds: float = 15.0
    trust_class: str = "volunteer"        # claimed (hpc, institution or volunteer); granted only by `certificate`
    certificate: Path | None = None       # an admitted institution's certificate of this key (essaim institution certify)
    available_until: float | None = None  # unix seconds; None: the Slurm job's end, else open-ended
    bandwidth_mbit: float = 0.0           # 0: unknown
    genesis: str = ""                     # the governed run's genesis hash to insist on (required to join one)
    device: str = "auto"                  # auto | cpu | cuda | cuda:N
    precision: str = "auto"               # auto | fp32 | bf16
    micro_batch_size: int | None = None   # rows per pass; None: the run's setting
    adversary: str = ""                   # tests and benchmarks only: misbehave this way (worker/adversary.py)
    metrics_port: int = 0                 # serve Prometheus metrics on host:port (worker/metrics.py); 0: none
    rated_watts: float = 0.0              # the device's rated power, for an energy estimate (worker/energy.py); 0: typical
    grid_gco2_per_kwh: float = 0.0        # the site's grid carbon intensity, declared at Register; 0: not declared


class Worker(OverlappedRounds):
    def __init__(self, options: WorkerOptions) -> None:
        self.options = options
        self.stop_requested = threading.Event()
        self.identity = Identity.load_or_create(options.identity_path)
        self.client = CoordinatorClient(options.coordinator, self.identity, retry_seconds=options.connect_seconds,
                                        tls=options.tls)
        self.last_loss = 0.0
        self.tokens_per_second = 0.0
        self.live_workers = 1
        self.draining = False  # the allocation ends: finish this round, then stop
        self.swarm_round = 0  # the coordinator's current round, as of the last heartbeat
        self._round_clock = time.perf_counter()
        self._stepped = False  # the first inner step is logged: a join's time to train shows in the log
        self._checkpointed_round = -1
        self._lineage_head = 0  # the newest lineage record the coordinator reported back
        self._learning_rates: tuple[float, float] | None = None  # in force, as last applied to the trainer
        self.adversary = adversary_for(options.adversary)
        self.quarantined = False  # a validator's check of this worker failed: the coordinator grants it nothing
        self._total_rounds = 0  # the run's, once its config is read
        # Overlapped averaging: the round the model trains, one ahead of the global parameters' while the
        # last round averages in the background (that thread, and whether the swarm kept its state).
        self._training_round = 0
        self._averaging: threading.Thread | None = None
        self._averaging_kept = False

    def run(self) -> int:
        """Train until the run is complete or a stop is requested; returns the round reached."""
        options = self.options
        plan = plan_device(options.device, options.precision)  # DeviceError: refused before Register
        self.energy = EnergyMeter.for_device(plan, options.rated_watts)
        self.metrics = WorkerMetrics(plan, self.energy.method)
        if options.metrics_port:
            self.metrics.serve(options.host, options.metrics_port)  # MetricsPortInUse: refused before Register
        workload = self._workload()
        estimate = check_fits(workload, plan)  # DoesNotFit: refused before Register
        log.info("training on %s in %s; the model needs about %.1f GiB there", plan.describe(), plan.precision,
                 estimate.device_bytes / (1 << 30))
        capabilities = detect(plan, options.trust_class, options.available_until, options.bandwidth_mbit)
        certificate = read_certificate(options.certificate, self.identity.public_key) if options.certificate else b""
        self.client.register(options.name or self.identity.worker_id[:8], options.institution, capabilities, certificate,
                             options.grid_gco2_per_kwh)
        config = self.client.run_config()
        self._total_rounds = config.total_rounds
        self.governance = RunGovernance(config, options.genesis)  # refuses a ledger that does not verify
        self.client.retry_seconds = max(60.0, 2.0 * config.lease_seconds)  # ride out a coordinator restart
        reader = self._shard_store(config)
        self.evaluator = RoundEvaluator(config, reader, self.identity.worker_id)  # every eval_every_rounds rounds
        checkpoint = self._checkpoint_to_resume(config)
        model = load_model(checkpoint) if checkpoint else build_model(config.model_preset, config.vocab_size, config.seed)
        credentials = CredentialCheck(config.credential_key, config.run_id)  # the coordinator's, for peers' credentials
        self.swarm = swarm = self._join_swarm(config, credentials)
        trainer: DiLoCoTrainer | None = None
        try:
            trainer = DiLoCoTrainer(model, DiLoCoSettings.for_run(config, workload.micro_batch_size), swarm.dht, plan,
                                    CredentialAdmission(credentials))
            trainer.sent_transform = self.adversary.sent_transform if self.adversary.kind else None
            if config.overlap_averaging:
                trainer.start_overlapping()
            if checkpoint is not None:
                restore_outer_state(trainer, checkpoint, round_started_at=time.time())
                self._checkpointed_round = trainer.round
                log.info("resumed from %s at round %d", checkpoint.path, trainer.round)
            with out_of_memory_refused(plan, workload):
                self.tokens_per_second = calibrate(trainer.forward_model, plan, config.vocab_size, config.batch_size,
                                                   config.seq_len, config.inner_lr, workload.micro_batch_size)
            trainer.discard_local_progress()  # calibration trained the real model
            log.info("%s: calibrated at %.0f tokens/s", capabilities.device, self.tokens_per_second)
            status = self.client.heartbeat(trainer.round, 0.0, self.tokens_per_second)
            self.live_workers, self.swarm_round = status.live_workers, status.current_round
            if status.current_round > trainer.round and not trainer.load_state_from_peers(
                    check=StateCheck.for_status(status, len(trainer.global_params))):
                log.warning(
                    "the run is at round %d but no peer shared its state: training from round %d",
                    status.current_round, trainer.round,
                )
            threading.Thread(target=self._heartbeat_loop, args=(config, trainer), daemon=True).start()
            self._round_clock = time.perf_counter()
            # Overlapping, a worker that joins asks for the round after its state's first: if others train it
            # already, the round its state starts is averaging, too late to join (the coordinator says which).
            self._training_round = trainer.round + 1 if config.overlap_averaging else trainer.round
            train_round = self._train_overlapped_round if config.overlap_averaging else self._train_one_round
            try:
                with out_of_memory_refused(plan, workload):
                    while not (self.stop_requested.is_set() or self.draining) and train_round(config, trainer, reader):
                        pass
            except AveragingCancelled as stopped:
                log.info("%s; the round's leases were released", stopped)
            finally:
                self._finish_averaging()  # overlapped: the last round's average and report (cancelled if stopping)
            if options.checkpoint_dir is not None and trainer.round > max(self._checkpointed_round, 0):
                trainer.discard_local_progress()  # a stop mid-round: keep the last outer step's state
                self._save_checkpoint(trainer, config, self._lineage_head)
            return trainer.round
        finally:
            self.stop_requested.set()
            if trainer is not None:
                trainer.shutdown()
            reader.close()
            swarm.close()
            self.client.close()
            self.energy.close()
            self.metrics.close()

    def _workload(self) -> Workload:
        """What the run needs this worker to hold in memory (public, asked before Register)."""
        shape = self.client.training_shape()
        micro = shape.micro_batch_size if self.options.micro_batch_size is None else self.options.micro_batch_size
        return Workload(shape.model_preset, shape.vocab_size, shape.seq_len, shape.batch_size,
                        min(micro, shape.batch_size), shape.error_feedback)

    def _shard_store(self, config: pb.RunConfig) -> ShardStore:
        """The run's shards: a local copy, the coordinator's directory if visible here, else a cache to fetch into."""
        store, data_dir, source = run_store(config, self.options.data_dir, self.client, self.options.cache_bytes)
        log.info("shards in %s; missing ones are fetched from %s", data_dir, source.describe())
        return store

    def _join_swarm(self, config: pb.RunConfig, credentials: CredentialCheck) -> Swarm:
        """A hivemind peer; in client mode when no peer could open a connection to it (NAT, firewall)."""
        options = self.options
        port = free_port(options.host, options.dht_port)  # fixed now: dialled back, then announced
        announce, client_mode = options.announce, options.client_mode
        if not client_mode:
            reach = ReachabilityCheck(self.client, options.host, port).run()
            if not reach.reachable:
                log.warning("peers cannot reach this worker (%s): it averages as a client-mode peer, which sends "
                            "and receives its share but reduces no slice", reach.error)
                client_mode = True
            elif not announce and options.host in ("0.0.0.0", "::"):
                announce = reach.seen_host  # the one address peers are known to reach
        swarm = Swarm(options.host, initial_peers=list(config.initial_peers), client_mode=client_mode, port=port,
                      announce=announce, credentials=credentials, dht_prefix=config.dht_prefix)
        self._peer_id = swarm.dht.peer_id.to_base58()
        return swarm

    def _train_one_round(self, config: pb.RunConfig, trainer: DiLoCoTrainer, reader: ShardStore) -> bool:
        """Lease, train, average, report. False when the run is complete or stopping."""
        if self.quarantined:
            return False
        config = self._governed(config, trainer, trainer.round)
        progress = RoundProgress()
        energy_mark = self.energy.start()
        try:
            deadline = trainer.round_started_at + config.round_seconds if config.round_seconds > 0 else math.inf
            if not self._train_inner_steps(config, trainer, reader, progress, trainer.round, deadline):
                return False
            loss_after = self._end_inner_steps(trainer, progress)
            trainer.expect_peers(self.live_workers)
            averaging_started = time.perf_counter()
            result = trainer.outer_step(
                progress.tokens, cancel=self.stop_requested,
                apply_alone=lambda: self._nobody_finished(trainer.round),
                give_up=lambda: self.swarm_round > trainer.round,
                entry=GroupEntry.signed(self.identity, config.run_id, trainer.round, progress.credential,
                                        progress.consumed, self.last_loss),
            )
            figures = RoundFigures(progress.tokens, self.tokens_per_second, self.last_loss, progress.inner_seconds,
                                   time.perf_counter() - averaging_started, result.bytes_sent if result else 0,
                                   self.energy.since(energy_mark, busy_seconds=progress.inner_seconds))
        except RoundOver as over:
            self._release(progress.leases, "the round was decided without this worker")
            self._catch_up(trainer, str(over))
            return True
        except BaseException:
            self._release(progress.leases, "worker stopped or failed before reporting")
            raise
        wall_seconds = time.perf_counter() - self._round_clock
        self._round_clock = time.perf_counter()
        if result is None:
            self.metrics.round_finished(figures, kept=False, next_round=trainer.round, report_seconds=0.0)
            self._release(progress.used_leases(), "not part of the swarm's model; back to the pool")
            self._catch_up(trainer, f"round {trainer.round}: others finished it without this worker")
            return True
        evaluation = self.evaluator.after_outer_step(trainer, result)  # held-out figures, when due; else None
        not_kept = self._report(trainer, progress, result, figures, loss_after, wall_seconds, evaluation)
        if not_kept:
            self._catch_up(trainer, not_kept)
            return True
        every = config.checkpoint_every_rounds
        if self.options.checkpoint_dir is not None and every > 0 and (result.round + 1) % every == 0:
            self._save_checkpoint(trainer, config, self._lineage_head)
        return True

    def _end_inner_steps(self, trainer: DiLoCoTrainer, progress: RoundProgress) -> float:
        """Give back the leases not trained on, read the round's loss and speed; the claim's probe loss after."""
        for lease in progress.unused_leases():
            self._release_quietly(lease.lease_id, "the round ended before training on it")
        drain_started = time.perf_counter()
        self.last_loss = progress.mean_loss()  # the one read of the device per round: it waits for the queued steps
        progress.inner_seconds += time.perf_counter() - drain_started
        loss_after = _probe_loss(trainer, progress.probe) if progress.probe is not None else 0.0
        self.tokens_per_second = progress.tokens / max(progress.inner_seconds, 1e-9)
        return loss_after

    def _report(self, trainer: DiLoCoTrainer, progress: RoundProgress, result: RoundResult, figures: RoundFigures,
                loss_after: float, wall_seconds: float, evaluation: pb.Evaluation | None) -> str:
        """Report the averaged round; "" if its tokens are recorded (or the report stays filed as we stop),
        else why not: its leases are then back in the pool, and the worker must adopt the swarm's state."""
        request = pb.CompleteRoundRequest(
            round=result.round,
            leases=[pb.LeaseUsage(lease_id=i, tokens_consumed=n) for i, n in progress.consumed.items()],
            loss=figures.inner_loss, pseudo_gradient_digest=result.pseudo_gradient_digest,
            params_digest=result.params_digest, group_size=result.group_size, bytes_sent=result.bytes_sent,
            inner_seconds=progress.inner_seconds, wall_seconds=wall_seconds, member_statements=result.member_statements,
            claim=pb.WorkClaim(
                pseudo_gradient_digest=result.local_digest, pseudo_gradient_norm=result.local_norm,
                loss_before=progress.loss_before, loss_after=loss_after, step_leases=progress.step_leases,
                micro_batch_size=trainer.settings.micro_batch_size, device=trainer.plan.describe(),
                precision=trainer.plan.precision,
            ),
            witnesses=result.witnesses, energy=pb.RoundEnergy(joules=figures.energy.joules, method=figures.energy.method),
            evaluation=evaluation,
        )
        report_started = time.perf_counter()
        try:
            reply = self.client.complete_round(request, stop=self.stop_requested.is_set)
        except CoordinatorRefused as refused:
            self.metrics.round_finished(figures, False, trainer.round, time.perf_counter() - report_started)
            self._release(progress.used_leases(), "the report was refused")
            return f"round {result.round}: {refused}"
        if reply.pending:
            return ""  # stopping: the report stays filed, and the coordinator decides its round without us
        self.metrics.round_finished(figures, reply.accepted, trainer.round, time.perf_counter() - report_started)
        if not reply.accepted:
            self._release(progress.used_leases(), "not part of the swarm's model; back to the pool")
            return (f"round {result.round}: the round kept another group's parameters "
                    f"({reply.round_params_digest[:12]}), which held more of its tokens; these "
                    f"({result.params_digest[:12]}) are dropped")
        self._lineage_head = reply.lineage_head
        log.info(
            "round %d: loss %.3f, %.0f tokens/s, averaged with %d peer(s), sent %d bytes",
            result.round, figures.inner_loss, figures.tokens_per_second, result.group_size - 1, result.bytes_sent,
        )
        return ""

    def _governed(self, config: pb.RunConfig, trainer: DiLoCoTrainer, round_number: int) -> pb.RunConfig:
        """This round's config: the ledger's settings in force at it, the ledger checked for news first."""
        if self.governance.ledger is None:
            return config
        try:
            reply = self.client.heartbeat(round_number, self.last_loss, self.tokens_per_second)
            if reply.governance_head != self.governance.head:
                self.governance.refresh(self.client.run_config())
        except (CoordinatorUnreachable, CoordinatorRefused) as error:
            log.warning("could not check the ledger for news (%s): training under the one verified before", error)
        governed = self.governance.round_config(config, round_number)
        lrs = (governed.inner_lr, governed.outer_lr)
        if lrs != self._learning_rates:
            log.info("round %d: learning rates inner %g, outer %g (ledger head %s)",
                     round_number, *lrs, self.governance.head[:16])
            trainer.set_learning_rates(*lrs)
            self._learning_rates = lrs
        compression = governed.compression or "none"
        if compression != trainer.compression:
            log.info("round %d: compression %s (ledger head %s)", round_number, compression, self.governance.head[:16])
            trainer.set_compression(compression)
        aggregation = governed.aggregation or "mean"
        if aggregation != trainer.aggregation:
            log.info("round %d: aggregation %s (ledger head %s)", round_number, aggregation, self.governance.head[:16])
            trainer.set_aggregation(aggregation)
        return governed

    def _nobody_finished(self, round_number: int) -> bool:
        """No group formed: go on alone only if no other worker has finished this round."""
        if self.live_workers <= 1:
            return True
        try:
            return self.client.heartbeat(round_number, self.last_loss, self.tokens_per_second).current_round <= round_number
        except (CoordinatorUnreachable, CoordinatorRefused):
            return False

    def _catch_up(self, trainer: DiLoCoTrainer, why: str, round_at_least: int = 0) -> None:
        """Adopt the swarm's state, as the coordinator recorded it: one model per round.

        `round_at_least`: a state no older than this round's start, waiting for the round before it to be
        decided if need be (overlapped averaging: that round may still be averaging).

        It tries until it has that state (or is stopped, or the run is complete): a worker that
        trained on from parameters no round kept would fork the run's lineage, and a validator
        replaying its next round from the recorded state would rightly find its claim false.
        """
        log.warning("%s; adopting the swarm's state", why)
        trainer.stop_sharing_state()
        while not self.stop_requested.is_set():
            try:  # the reply's round may lag the decision by up to half a second: each try reads it again
                status = self.client.heartbeat(trainer.round, self.last_loss, self.tokens_per_second)
            except (CoordinatorUnreachable, CoordinatorRefused) as error:
                log.warning("cannot learn which state the swarm kept (%s); trying again", error)
                self.stop_requested.wait(POOL_EMPTY_WAIT_SECONDS)
                continue
            if status.quarantined:
                self._quarantine()
                return
            if status.current_round >= self._total_rounds:
                return  # nothing left to train: the next lease request ends the run
            if status.current_round < round_at_least:
                self.stop_requested.wait(POOL_EMPTY_WAIT_SECONDS)
                continue
            if trainer.load_state_from_peers(check=StateCheck.for_status(status, len(trainer.global_params))):
                return
            log.warning("no peer shared the state round %d kept; trying again", status.current_round - 1)
            self.stop_requested.wait(POOL_EMPTY_WAIT_SECONDS)

    def _quarantine(self) -> None:
        log.error("the coordinator quarantined this worker: a validator's replay of one of its rounds disagreed with "
                  "what it sent (`essaim audit verify` names the check); it gets no more leases")
        self.quarantined = True

    def _release(self, leases: list[pb.Lease], reason: str) -> None:
        for lease in leases:
            self._release_quietly(lease.lease_id, reason)

    def _train_inner_steps(self, config: pb.RunConfig, trainer: DiLoCoTrainer, reader: ShardStore,
                           progress: RoundProgress, round_number: int, deadline: float) -> bool:
        """Inner steps until the round's token or time budget is spent. False: the run is complete.

        The round trains on up to leases_per_round leases at once, a batch from each in
        turn (each lease is still consumed as a prefix of its range), so that every
        worker's pseudo-gradient mixes shards and sources, as its peers' do.
        """
        budget = config.inner_steps * config.batch_size * config.seq_len
        streams: deque[tuple[pb.Lease, Iterator[torch.Tensor]]] = deque()
        leased = 0
        while progress.tokens < budget and (time.time() < deadline or progress.tokens == 0):
            while len(streams) < max(config.leases_per_round, 1) and leased < budget:
                reply = self.client.acquire_lease(budget - leased, round_number, self._peer_id)
                if reply.status == pb.AcquireLeaseReply.RUN_COMPLETE:
                    log.info("run complete after %d rounds", round_number)
                    for lease in progress.leases:
                        self._release_quietly(lease.lease_id, "the run is complete")
                    return False
                if reply.status == pb.AcquireLeaseReply.ALLOCATION_ENDING:
                    log.info("the allocation ends soon: this is the last round")
                    self.draining = True
                    if not progress.leases:
                        return False
                    break
                if reply.status == pb.AcquireLeaseReply.BACKOFF:
                    log.warning("leases expired in a row: the coordinator asks to wait %d ms", reply.retry_after_ms)
                    if self.stop_requested.wait(reply.retry_after_ms / 1000):
                        raise AveragingCancelled("stop requested during a back-off")
                    continue
                if reply.status in (pb.AcquireLeaseReply.POOL_EMPTY, pb.AcquireLeaseReply.AT_LIMIT):
                    break  # train what it holds (AT_LIMIT: as much as one worker may hold)
                if reply.status == pb.AcquireLeaseReply.ROUND_OVER:
                    raise RoundOver(f"round {round_number}: the coordinator decided it without this worker")
                if reply.status == pb.AcquireLeaseReply.NOT_OPEN:
                    raise RoundNotOpen(f"round {round_number} is not open yet")
                if reply.status == pb.AcquireLeaseReply.QUARANTINED:
                    self._quarantine()
                    self._release(progress.leases, "quarantined")
                    return False
                progress.leases.append(reply.lease)
                progress.credential = reply.round_credential
                self.swarm.hold_credential(reply.round_credential)  # our DHT records carry it from now on
                # Fetched in the background: the round's leases download side by side (worker/shards.py).
                read = self.adversary.lease_to_read(reply.lease, reader.manifest.shards if reader.manifest else [])
                streams.append((reply.lease, batches_when_fetched(reader.prefetch(read), config.batch_size,
                                                                  config.seq_len)))
                leased += reply.lease.end - reply.lease.start
            if not streams:
                if progress.tokens:
                    break  # nothing left to lease: average what this round has
                if self.stop_requested.wait(POOL_EMPTY_WAIT_SECONDS):
                    raise AveragingCancelled("stop requested while waiting for tokens")
                continue
            lease, stream = streams.popleft()
            batch = next(stream, None)
            if batch is None:
                continue  # this lease is spent
            if self.stop_requested.is_set():
                raise AveragingCancelled("stop requested during inner steps")
            started = time.perf_counter()
            progress.step_leases.append(lease.lease_id)
            # The claim's probe losses cost two forward passes a round: only while a validator may replay it.
            if progress.probe is None and batch.shape[1] > 1 and config.verify_fraction > 0:
                progress.probe = batch
                progress.loss_before = _probe_loss(trainer, batch)  # the round's start state: a validator's too
            if batch.shape[1] > 1 and self.adversary.trains():
                progress.add_loss(trainer.inner_step(batch))
                if not self._stepped:
                    self._stepped = True
                    log.info("first inner step: the worker trains")
            progress.inner_seconds += time.perf_counter() - started
            progress.consumed[lease.lease_id] = progress.consumed.get(lease.lease_id, 0) + batch.numel()
            progress.tokens += batch.numel()
            streams.append((lease, stream))
        return True

    def _save_checkpoint(self, trainer: DiLoCoTrainer, config: pb.RunConfig, lineage_head: int) -> None:
        assert self.options.checkpoint_dir is not None
        path = save_checkpoint(self.options.checkpoint_dir, trainer, config, lineage_head,
                               self.governance.config_version(trainer.round - 1))
        self._checkpointed_round = trainer.round
        log.info("checkpoint of round %d saved to %s", trainer.round - 1, path)

    def _checkpoint_to_resume(self, config: pb.RunConfig) -> Checkpoint | None:
        if self.options.checkpoint_dir is None:
            return None
        path = latest_checkpoint(self.options.checkpoint_dir)
        if path is None:
            return None
        checkpoint = read_checkpoint(path)
        if checkpoint.run_id != config.run_id:
            raise CheckpointError(
                f"{path} belongs to run {checkpoint.run_id}, but the coordinator serves run {config.run_id}: "
                "use another --checkpoint-dir for this run"
            )
        return checkpoint

    def _release_quietly(self, lease_id: int, reason: str) -> None:
        try:
            self.client.release_lease(lease_id, reason)
        except CoordinatorRefused as error:  # already back in the pool (a round decision, an expiry), or recorded
            log.debug("lease %d not released: %s", lease_id, error.details)
        except Exception as error:  # the lease will expire at its deadline anyway
            log.warning("could not release lease %d (%s); it will expire at its deadline", lease_id, error)

    def _heartbeat_loop(self, config: pb.RunConfig, trainer: DiLoCoTrainer) -> None:
        while not self.stop_requested.wait(config.heartbeat_seconds):
            try:
                reply = self.client.heartbeat(trainer.round, self.last_loss, self.tokens_per_second)
                self.live_workers, self.swarm_round = reply.live_workers, reply.current_round
                if reply.governance_head and reply.governance_head != self.governance.head:
                    self.governance.refresh(self.client.run_config())
            except Exception as error:
                log.warning("heartbeat failed: %s", error)


def _probe_loss(trainer: DiLoCoTrainer, batch: torch.Tensor) -> float:
    return probe_loss(trainer.forward_model, batch, trainer.plan, trainer.settings.micro_batch_size)




def run_worker(options: WorkerOptions) -> int:
    """Entry point for the CLI: own process group, signal handling, exit code."""
    if os.getpid() != os.getpgid(0):
        os.setpgid(0, 0)
    worker = Worker(options)
    main_pid = os.getpid()

    def request_stop(signum: int, _frame: object) -> None:
        if os.getpid() != main_pid:
            return  # a hivemind child, signalled with the whole job (Slurm): the worker shuts it down
        log.info("received %s: releasing the lease and leaving the swarm", signal.Signals(signum).name)
        worker.stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    rounds = worker.run()
    log.info("worker %s stopped after %d rounds", worker.identity.worker_id[:8], rounds)
    return QUARANTINED_EXIT if worker.quarantined else 0
