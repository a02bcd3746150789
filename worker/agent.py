"""`essaim worker join`: register, then lease -> train -> average -> report, until the run ends.

The worker makes itself a process-group leader so that its supervisor (the demo,
Slurm, a test) can stop the agent and every hivemind child with one signal. On
SIGTERM or SIGINT it gives its lease back and shuts hivemind down before exiting.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from model.presets import build_model
from model.tokenizer import tokenizer_from_json
from protocol import essaim_pb2 as pb
from protocol.identity import Identity
from protocol.swarm import Swarm
from worker.client import CoordinatorClient
from worker.data import ShardReader, batches
from worker.diloco import AveragingCancelled, DiLoCoSettings, DiLoCoTrainer

log = logging.getLogger("essaim.worker")

POOL_EMPTY_WAIT_SECONDS = 1.0


@dataclass(frozen=True)
class WorkerOptions:
    coordinator: str
    identity_path: Path
    name: str = ""
    institution: str = "independent"
    host: str = "127.0.0.1"
    data_dir: Path | None = None          # default: the shard directory the coordinator announces
    checkpoint_dir: Path | None = None    # where to save the final model, if anywhere
    connect_seconds: float = 15.0


class Worker:
    def __init__(self, options: WorkerOptions) -> None:
        self.options = options
        self.stop_requested = threading.Event()
        self.identity = Identity.load_or_create(options.identity_path)
        self.client = CoordinatorClient(options.coordinator, self.identity, retry_seconds=options.connect_seconds)
        self.last_loss = 0.0
        self.tokens_per_second = 0.0
        self.live_workers = 1

    def run(self) -> int:
        """Train until the run is complete or a stop is requested; returns the round reached."""
        options = self.options
        self.client.register(options.name or self.identity.worker_id[:8], options.institution, device="cpu")
        config = self.client.run_config()
        self.client.retry_seconds = max(60.0, 2.0 * config.lease_seconds)  # ride out a coordinator restart
        reader = ShardReader(options.data_dir or Path(config.shard_dir))
        model = build_model(config.model_preset, config.vocab_size, config.seed)
        swarm = Swarm(options.host, initial_peers=list(config.initial_peers))
        trainer: DiLoCoTrainer | None = None
        try:
            trainer = DiLoCoTrainer(model, _diloco_settings(config), swarm.dht)
            if self.client.heartbeat(0, 0.0, 0.0).current_round > 0:
                # Joining a run under way: start from the swarm's state, not from the seed.
                trainer.load_state_from_peers()
            threading.Thread(target=self._heartbeat_loop, args=(config, trainer), daemon=True).start()
            try:
                while not self.stop_requested.is_set() and self._train_one_round(config, trainer, reader):
                    pass
            except AveragingCancelled as stopped:
                log.info("%s; the lease was released", stopped)
            if options.checkpoint_dir is not None and not self.stop_requested.is_set():
                save_checkpoint(model, config, options.checkpoint_dir)
            return trainer.round
        finally:
            self.stop_requested.set()
            if trainer is not None:
                trainer.shutdown()
            swarm.close()
            self.client.close()

    def _train_one_round(self, config: pb.RunConfig, trainer: DiLoCoTrainer, reader: ShardReader) -> bool:
        """Lease, train, average, report. False when the run is complete or stopping."""
        tokens_per_round = config.inner_steps * config.batch_size * config.seq_len
        reply = self.client.acquire_lease(tokens_per_round, trainer.round)
        if reply.status == pb.AcquireLeaseReply.RUN_COMPLETE:
            log.info("run complete after %d rounds", trainer.round)
            return False
        if reply.status == pb.AcquireLeaseReply.POOL_EMPTY:
            self.stop_requested.wait(POOL_EMPTY_WAIT_SECONDS)
            return True
        lease = reply.lease
        try:
            tokens = reader.tokens(lease)
            started, losses = time.perf_counter(), []
            for batch in batches(tokens, config.batch_size, config.seq_len):
                if self.stop_requested.is_set():
                    raise AveragingCancelled("stop requested during inner steps")
                if batch.shape[1] > 1:
                    losses.append(trainer.inner_step(batch))
            self.tokens_per_second = tokens.numel() / max(time.perf_counter() - started, 1e-9)
            self.last_loss = sum(losses) / max(len(losses), 1)
            result = trainer.outer_step(tokens.numel(), cancel=self.stop_requested)
        except BaseException:
            self._release_quietly(lease.lease_id, "worker stopped or failed before reporting")
            raise
        self.client.complete_lease(
            pb.CompleteLeaseRequest(
                lease_id=lease.lease_id, tokens_consumed=tokens.numel(), loss=self.last_loss,
                pseudo_gradient_digest=result.pseudo_gradient_digest, round=result.round,
                group_size=result.group_size,
            )
        )
        log.info(
            "round %d: loss %.3f, %.0f tokens/s, averaged with %d peer(s)",
            result.round, self.last_loss, self.tokens_per_second, result.group_size - 1,
        )
        if result.group_size == 1 and self.live_workers > 1:
            # Others are training but none averaged with us: our weights have drifted.
            trainer.load_state_from_peers()
        return True

    def _release_quietly(self, lease_id: int, reason: str) -> None:
        try:
            self.client.release_lease(lease_id, reason)
        except Exception as error:  # the lease will expire at its deadline anyway
            log.warning("could not release lease %d (%s); it will expire at its deadline", lease_id, error)

    def _heartbeat_loop(self, config: pb.RunConfig, trainer: DiLoCoTrainer) -> None:
        while not self.stop_requested.wait(config.heartbeat_seconds):
            try:
                reply = self.client.heartbeat(trainer.round, self.last_loss, self.tokens_per_second)
                self.live_workers = reply.live_workers
            except Exception as error:
                log.warning("heartbeat failed: %s", error)


def _diloco_settings(config: pb.RunConfig) -> DiLoCoSettings:
    return DiLoCoSettings(
        inner_lr=config.inner_lr, outer_lr=config.outer_lr, outer_momentum=config.outer_momentum,
        dht_prefix=config.dht_prefix, target_group_size=config.target_group_size,
        matchmaking_seconds=config.matchmaking_seconds, averaging_timeout_seconds=config.averaging_timeout_seconds,
    )


def save_checkpoint(model, config: pb.RunConfig, directory: Path) -> None:  # type: ignore[no-untyped-def]
    """Hugging Face format: AutoModelForCausalLM and AutoTokenizer load it offline."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer_from_json(config.tokenizer_json).save_pretrained(directory)


def run_worker(options: WorkerOptions) -> int:
    """Entry point for the CLI: own process group, signal handling, exit code."""
    if os.getpid() != os.getpgid(0):
        os.setpgid(0, 0)
    worker = Worker(options)

    def request_stop(signum: int, _frame: object) -> None:
        log.info("received %s: releasing the lease and leaving the swarm", signal.Signals(signum).name)
        worker.stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    rounds = worker.run()
    log.info("worker %s stopped after %d rounds", worker.identity.worker_id[:8], rounds)
    return 0
