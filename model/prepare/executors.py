"""Where a preparation's stages run: local processes, or Slurm job arrays (datatrove's executors).

Both run the same stages in the same order with the same tasks, so they write the same
files. Each stage's tasks leave completion markers under the work directory's
``logs/<stage>/completions``: a rerun skips the tasks that finished.

On Slurm every stage is one job array that starts once the previous stage's job ended
well (``afterok``); this process submits them all, then waits, and names a failed task
with its log. ``--dry-run`` prints the job scripts instead of submitting them.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr, suppress
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Literal

from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.utils.logging import logger, setup_default_logger
from pydantic import BaseModel, ConfigDict, Field, model_validator

from model.prepare.dedup import MAX_TASKS
from model.prepare.filtering import PrepareStopped
from model.prepare.work import WorkDir


class ExecutorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["local", "slurm"] = "local"
    tasks: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=MAX_TASKS)
    partition: str | None = None  # Slurm: the partition the jobs run in
    time: str = "24:00:00"  # Slurm: each task's time limit
    cpus_per_task: int = Field(1, ge=1)
    mem_per_cpu_gb: int = Field(2, ge=1)
    poll_seconds: float = Field(2.0, gt=0)  # Slurm: how often the jobs' progress is read

    @model_validator(mode="after")
    def _slurm_needs_a_partition(self) -> "ExecutorSettings":
        if self.kind == "slurm" and not self.partition:
            raise ValueError("the Slurm executor needs a partition: give --partition (sinfo lists them)")
        return self


@dataclass(frozen=True)
class Stage:
    name: str
    pipeline: list[PipelineStep]
    tasks: int


class PrepareFailed(RuntimeError):
    """A task failed; the work directory is kept, and the same command resumes from it."""


class _QuietLocalExecutor(LocalPipelineExecutor):
    """Every task logs to its file only; the console gets errors (datatrove prints task 0's whole log)."""

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):  # type: ignore[no-untyped-def]
        return super()._run_for_rank(rank, local_rank=1, node_rank=node_rank)


@contextmanager
def _console_into(path: Path) -> Iterator[None]:
    """datatrove's console output (its logs, stats and progress bars) into a file: the caller reports progress.

    Forked tasks inherit the redirection; each task's own log is in ``logs/task_<rank>.log`` beside.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as console, redirect_stderr(console):
        logger.remove()
        logger.add(console, level="INFO")
        try:
            yield
        finally:
            setup_default_logger()  # back on the real standard error


class _SlurmStage(SlurmPipelineExecutor):
    def launch_merge_stats(self) -> None:
        """No job merging datatrove's stats: the prepare report is the tasks' own counts, and a job waiting on
        a failed stage would wait forever."""


def run_locally(stages: list[Stage], settings: ExecutorSettings, work: WorkDir, log: Callable[[str], None]) -> None:
    cores = os.cpu_count() or 1
    for stage in stages:
        executor = _QuietLocalExecutor(stage.pipeline, tasks=stage.tasks, workers=min(stage.tasks, cores),
                                       logging_dir=str(work.logs(stage.name)), start_method="fork")
        finished = stage.tasks - len(executor.get_incomplete_ranks())
        log(f"{stage.name}: {stage.tasks} task{'s' if stage.tasks > 1 else ''}"
            + (f", {finished} finished before" if finished else ""))
        with _console_into(work.logs(stage.name) / "console.log"):
            outcome, message = _run_in_child(executor)
        if outcome == "stopped":
            raise PrepareStopped(message)
        if outcome == "failed":
            raise PrepareFailed(_failure(stage, work, message))


def _run_in_child(executor: LocalPipelineExecutor) -> tuple[Literal["done", "stopped", "failed"], str]:
    """Run a stage in a forked process, as a Slurm job would: what its tasks allocate (a tokenizer trainer's
    tables, the largest document) is handed back when it ends, and no later stage's tasks fork from it.

    datatrove runs a one-worker stage in the calling process, so without this the single-task stages would
    grow this process and every task forked after them.
    """
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_run_and_tell, args=(executor, send), name="essaim-prepare-stage")
    child.start()
    send.close()
    with suppress(OSError):  # its own process group, so that ending it ends its task processes (the child sets it too)
        os.setpgid(child.pid, child.pid)
    try:
        with _sigterm_ends_the_stage():
            outcome = receive.recv()
    except EOFError:  # it died without a word: killed, most likely for memory
        child.join()
        return "failed", f"its process ended with exit code {child.exitcode} (a negative code is the signal)"
    except BaseException:  # this process is ending (interrupted): the stage's tasks end with it
        with suppress(OSError):
            os.killpg(child.pid, signal.SIGTERM)
        child.join()
        raise
    child.join()
    return outcome


@contextmanager
def _sigterm_ends_the_stage() -> Iterator[None]:
    """A SIGTERM to this process (a kill, a service stopping) raises here as Ctrl-C does, so the caller ends
    the stage's process group before this process ends: nothing it started runs on."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def terminated(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_and_tell(executor: LocalPipelineExecutor, send: Connection) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler: SIGTERM ends the stage
    with suppress(OSError):
        os.setpgid(0, 0)
    try:
        executor.run()
        send.send(("done", ""))
    except PrepareStopped as stopped:
        send.send(("stopped", str(stopped)))
    except BaseException as error:  # noqa: BLE001 - everything goes back to the parent, which names the task
        send.send(("failed", str(error) or type(error).__name__))


def slurm_executors(stages: list[Stage], settings: ExecutorSettings, work: WorkDir, run_id: str) -> list[_SlurmStage]:
    """One Slurm executor per stage, each depending on the one before."""
    activate = Path(sys.prefix) / "bin" / "activate"
    executors: list[_SlurmStage] = []
    for stage in stages:
        executors.append(_SlurmStage(
            stage.pipeline, tasks=stage.tasks, time=settings.time, partition=settings.partition,
            cpus_per_task=settings.cpus_per_task, mem_per_cpu_gb=settings.mem_per_cpu_gb,
            job_name=job_name(run_id, stage.name), qos="", logging_dir=str(work.logs(stage.name)),
            depends=executors[-1] if executors else None,
            env_command=f"source {activate}" if activate.exists() else None,
        ))
    return executors


def job_name(run_id: str, stage: str) -> str:
    return f"essaim-prepare-{run_id}-{stage}"


def dry_run(stages: list[Stage], settings: ExecutorSettings, work: WorkDir, run_id: str) -> str:
    """The job scripts that would be submitted, in order, each with what it waits for."""
    scripts = []
    previous = None
    for stage, executor in zip(stages, slurm_executors(stages, settings, work, run_id)):
        waits = f"sbatch --dependency=afterok:<job of {previous}>" if previous else "sbatch"
        command = f"srun -l -n 1 launch_pickled_pipeline {work.logs(stage.name) / 'executor.pik'}"
        script = executor.get_launch_file_contents(executor.get_sbatch_args(min(stage.tasks, executor.max_array_size)),
                                                   command)
        scripts.append(f"# stage {stage.name}: {stage.tasks} task{'s' if stage.tasks > 1 else ''}; {waits}\n{script}")
        previous = stage.name
    return "\n".join(scripts)


def run_on_slurm(stages: list[Stage], settings: ExecutorSettings, work: WorkDir, run_id: str,
                 log: Callable[[str], None]) -> None:
    executors = slurm_executors(stages, settings, work, run_id)
    if _jobs_alive(run_id, stages):  # an earlier, interrupted command's: submitting again would run tasks twice
        log(f"this preparation's Slurm jobs ({job_name(run_id, '*')}) are still queued or running: waiting for them")
    else:
        _cancel(run_id, stages)  # jobs an earlier command left waiting on a stage that failed
        finished = sum(not executor.get_incomplete_ranks() for executor in executors)
        with _console_into(work.root / "logs" / "submit.log"):
            executors[-1].run()  # submits every stage not yet complete, each after the one before
        log(f"submitted {len(stages) - finished} Slurm job arrays ({job_name(run_id, '*')})"
            + (f"; {finished} stages had finished before" if finished else "") + "; waiting for them")
    try:
        _wait(stages, executors, settings, work, run_id, log)
    except KeyboardInterrupt:
        raise PrepareFailed(f"interrupted: the Slurm jobs ({job_name(run_id, '*')}) go on. Run the same command again "
                            "to wait for them and publish the corpus, or cancel them with scancel") from None


def _wait(stages: list[Stage], executors: list[_SlurmStage], settings: ExecutorSettings, work: WorkDir, run_id: str,
          log: Callable[[str], None]) -> None:
    reported = ""
    while (unfinished := _first_unfinished(stages, executors)) is not None:
        stage, ranks = unfinished
        progress = f"{stage.name}: {stage.tasks - len(ranks)}/{stage.tasks} tasks done"
        if progress != reported:
            log(progress)
            reported = progress
        if not _jobs_alive(run_id, stages):
            time.sleep(settings.poll_seconds)  # a task's marker is written just before its job ends: look once more
            if _first_unfinished(stages, executors) is not None:
                _cancel(run_id, stages)
                if stopped := _stop_message(stage, work):
                    raise PrepareStopped(stopped)
                raise PrepareFailed(_failure(stage, work, "its Slurm job ended"))
        time.sleep(settings.poll_seconds)


def _first_unfinished(stages: list[Stage], executors: list[_SlurmStage]) -> tuple[Stage, list[int]] | None:
    for stage, executor in zip(stages, executors):
        if ranks := executor.get_incomplete_ranks(skip_completed=True):
            return stage, ranks
    return None


def _jobs_alive(run_id: str, stages: list[Stage]) -> bool:
    """Whether this run's jobs can still finish: some are queued or running, and none waits on a failed stage.

    The stages form a chain, so once one job's dependency can never be met, none after it will run.
    """
    names = ",".join(job_name(run_id, stage.name) for stage in stages)
    listing = subprocess.run(["squeue", "-h", "--name", names, "-o", "%T %r"], capture_output=True, text=True,
                             check=True).stdout.splitlines()
    return bool(listing) and not any("DependencyNeverSatisfied" in line for line in listing)


def _cancel(run_id: str, stages: list[Stage]) -> None:
    """This run's jobs still waiting on a dependency that failed (jobs of this run only: found by their names)."""
    names = ",".join(job_name(run_id, stage.name) for stage in stages)
    jobs = subprocess.run(["squeue", "-h", "--name", names, "-o", "%A"], capture_output=True, text=True,
                          check=False).stdout.split()
    if jobs:
        subprocess.run(["scancel", *sorted(set(jobs))], capture_output=True, check=False)


def _failure(stage: Stage, work: WorkDir, cause: str) -> str:
    """Which tasks of a stage failed, with their logs, and how to resume."""
    logs = work.logs(stage.name)
    done = {path.name for path in (logs / "completions").glob("*")}
    failed = [rank for rank in range(stage.tasks) if f"{rank:05d}" not in done]
    named = []
    for rank in failed:
        task_log = logs / "logs" / f"task_{rank:05d}.log"
        last = _last_error(task_log)
        named.append(f"task {rank} (log: {task_log}{': ' + last if last else ''})")
    return (f"stage {stage.name!r} failed ({cause}): {'; '.join(named) or 'no task log'}. The {stage.tasks - len(failed)} "
            "finished tasks of that stage and every earlier stage are kept: run the same command again to resume")


def _stop_message(stage: Stage, work: WorkDir) -> str:
    """A task's PrepareStopped message (a bad record, with on_bad_record = "stop"), if that is what ended it."""
    marker = f"{PrepareStopped.__name__}: "
    for task_log in sorted((work.logs(stage.name) / "logs").glob("task_*.log")):
        for line in task_log.read_text(errors="replace").splitlines():
            if marker in line:
                return line.split(marker, 1)[1].strip()
    return ""


def _last_error(task_log: Path) -> str:
    if not task_log.exists():
        return "it never started"
    errors = [line for line in task_log.read_text(errors="replace").splitlines()
              if "Error" in line or "Exception" in line]
    return errors[-1].strip() if errors else ""
