"""Overlapped averaging (RunConfig.overlap_averaging): round r averages in the background while round r+1 trains.

`OverlappedRounds` is the part of the worker (worker/agent.py `Worker`) that runs such rounds; it
uses the worker's leasing, reporting and catching up, and the trainer's overlapped steps
(worker/diloco.py: take_round_progress, hand_over, delayed_outer_step).
"""

from __future__ import annotations

import logging
import math
import threading
import time

from protocol import essaim_pb2 as pb
from worker.diloco import AveragingCancelled, DiLoCoTrainer
from worker.metrics import RoundFigures
from worker.peer_admission import GroupEntry
from worker.round_progress import RoundNotOpen, RoundOver, RoundProgress
from worker.shards import ShardStore

log = logging.getLogger("essaim.worker")


class OverlappedRounds:
    """A mixin of `Worker`: its attributes and round helpers (leasing, `_report`, `_catch_up`) are the worker's."""

    # Set by Worker.__init__: the round the model trains (one ahead of the global parameters' while the
    # last round averages), that round's averaging thread, and whether the swarm kept its state.
    _training_round: int
    _averaging: threading.Thread | None
    _averaging_kept: bool

    def _train_overlapped_round(self, config: pb.RunConfig, trainer: DiLoCoTrainer, reader: ShardStore) -> bool:
        """Overlapped averaging (RunConfig.overlap_averaging): train round m while round m-1 averages and
        reports in the background; then hand round m over to be averaged the same way. False: stop.

        Round m's pseudo-gradient is taken from where round m started; the model then restarts from
        round m-1's average plus that progress (DiLoCoTrainer.hand_over). A worker whose round m-1 was
        not kept (or not averaged) adopts the state the coordinator recorded for round m's start first,
        keeping round m's progress. Governance settings apply at the hand-over, the inner rate included:
        a change lands on the inner steps one round later than without overlap.
        """
        if self.quarantined:
            self._finish_averaging()
            return False
        round_number = self._training_round
        progress = RoundProgress()
        energy_mark = self.energy.start()
        # Timed rounds end when the swarm's do: the global parameters' round began training at
        # round_started_at (here, or at the peer this worker's state came from), and rounds follow it.
        rounds_after = round_number - trainer.round + 1
        deadline = (trainer.round_started_at + rounds_after * config.round_seconds if config.round_seconds > 0
                    else math.inf)
        try:
            if not self._train_inner_steps(config, trainer, reader, progress, round_number, deadline):
                self._finish_averaging()
                return False
            loss_after = self._end_inner_steps(trainer, progress)
            measured = (self.last_loss, self.tokens_per_second)  # this round's: the next one overwrites them
            waited = time.perf_counter()
            kept = self._finish_averaging()  # the averager's buffers are ours again
            waited = time.perf_counter() - waited  # the averaging the round could not hide
            claim = trainer.take_round_progress()  # before a catch-up: loading a state resets the model
            if not kept or trainer.round != round_number:
                self._catch_up(trainer, f"round {round_number}: the state it started from was not the swarm's",
                               round_at_least=round_number)
                if trainer.round != round_number:  # decided without this worker meanwhile: its progress is void
                    self._release(progress.leases, "the round was decided without this worker")
                    self._training_round = trainer.round + 1
                    return True
        except RoundOver as over:
            self._finish_averaging()
            self._release(progress.leases, "the round was decided without this worker")
            self._catch_up(trainer, str(over))
            self._training_round = trainer.round + 1  # its group may be averaging already: try the next one
            return True
        except RoundNotOpen:
            self._release(progress.leases, "the round is not open yet")
            self._training_round = trainer.round  # nobody trains the next round yet: the open one, then
            return True
        except BaseException:
            self._release(progress.leases, "worker stopped or failed before reporting")
            self._finish_averaging()
            raise
        every = config.checkpoint_every_rounds
        if (self.options.checkpoint_dir is not None and every > 0 and round_number % every == 0
                and round_number > max(self._checkpointed_round, 0)):
            with trainer.global_params_in_model():  # the state round m-1 kept, not the model's own progress
                self._save_checkpoint(trainer, config, self._lineage_head)
        config = self._governed(config, trainer, round_number)
        trainer.hand_over()
        trainer.expect_peers(self.live_workers)
        entry = GroupEntry.signed(self.identity, config.run_id, round_number, progress.credential, progress.consumed,
                                  self.last_loss)
        self._averaging = threading.Thread(
            target=self._average_and_report, name=f"average-round-{round_number}", daemon=True,
            args=(trainer, progress, claim, entry, loss_after, measured, energy_mark, waited))
        self._averaging_kept = False
        self._averaging.start()
        self._training_round = round_number + 1
        return True

    def _average_and_report(self, trainer: DiLoCoTrainer, progress: RoundProgress, claim: tuple[str, float],
                            entry: GroupEntry, loss_after: float, measured: tuple[float, float], energy_mark: float,
                            waited: float) -> None:
        """In the background, beside the next round's inner steps: round m's average, outer step and report."""
        round_number = trainer.round
        started = time.perf_counter()
        try:
            result = trainer.delayed_outer_step(
                progress.tokens, self.stop_requested, claim,
                apply_alone=lambda: self._nobody_finished(round_number),
                give_up=lambda: self.swarm_round > round_number, entry=entry)
        except AveragingCancelled as stopped:
            log.info("%s; the round's leases were released", stopped)
            self._release(progress.leases, "worker stopped while averaging")
            return
        except Exception:
            log.exception("round %d: averaging failed", round_number)
            self._release(progress.leases, "averaging failed")
            return
        # Only the wait at the hand-over kept the next round from training: the rest ran beside it.
        loss, tokens_per_second = measured
        figures = RoundFigures(progress.tokens, tokens_per_second, loss, progress.inner_seconds, waited,
                               result.bytes_sent if result else 0,
                               self.energy.since(energy_mark, busy_seconds=progress.inner_seconds))
        wall_seconds = time.perf_counter() - self._round_clock
        self._round_clock = time.perf_counter()
        if result is None:
            self.metrics.round_finished(figures, kept=False, next_round=trainer.round, report_seconds=0.0)
            self._release(progress.used_leases(), "not part of the swarm's model; back to the pool")
            log.warning("round %d: others finished it without this worker", round_number)
            return
        log.debug("round %d averaged in %.2f s beside the next round", round_number, time.perf_counter() - started)
        not_kept = self._report(trainer, progress, result, figures, loss_after, wall_seconds, None)
        if not_kept:
            log.warning("%s; it adopts the swarm's state at its next round's end", not_kept)
            return
        self._averaging_kept = True

    def _finish_averaging(self) -> bool:
        """Wait for the round averaging in the background, if any; True if its state is the one the swarm kept."""
        if self._averaging is None:
            return True
        self._averaging.join()
        self._averaging = None
        return self._averaging_kept
