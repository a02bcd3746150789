"""Slurm: an sbatch script that starts one Essaim worker per task, and what squeue/scontrol say of such jobs.

Each worker finds its job id (SLURM_JOB_ID) and its allocation's end (scontrol's
EndTime) itself and declares them at Register, so the coordinator never leases it
tokens it cannot train before the walltime. Slurm sends every task SIGTERM
``drain_seconds`` before the walltime (--signal): the workers report what they
trained, release the rest of their leases, and leave.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

JOB_NAME = "essaim-worker"
_WALLTIME = re.compile(r"^(\d+-)?\d{1,2}:\d{2}:\d{2}$")


class SlurmError(Exception):
    """A Slurm command failed or a job description is invalid; the message says which and why."""


@dataclass(frozen=True)
class SlurmJob:
    coordinator: str               # HOST:PORT the workers join
    partition: str
    nodes: int
    time: str                      # walltime, [D-]HH:MM:SS
    workdir: Path                  # keys, logs and checkpoints go here (a shared file system)
    account: str = ""
    gpus_per_node: int = 0         # > 0: one worker per GPU
    tasks_per_node: int = 1        # workers per node when there are no GPUs
    institution: str = "hpc"
    listen_host: str = "127.0.0.1"  # where each worker's hivemind peer listens; "node": the node's first address
    drain_seconds: int = 120       # SIGTERM this long before the walltime
    checkpoints: bool = True

    def __post_init__(self) -> None:
        if not _WALLTIME.match(self.time):
            raise SlurmError(f"--time {self.time!r}: write the walltime as HH:MM:SS or D-HH:MM:SS")
        if self.nodes < 1 or self.tasks_per_node < 1 or self.gpus_per_node < 0:
            raise SlurmError("--nodes and tasks per node must be at least 1, --gpus-per-node at least 0")
        if not self.partition:
            raise SlurmError("--partition is required: name the partition to run on (sinfo lists them)")


def render_sbatch(job: SlurmJob, essaim: list[str] | None = None) -> str:
    """The batch script for ``job``; ``essaim`` is the command that runs Essaim on the nodes."""
    essaim = essaim or [sys.executable, "-m", "essaim"]
    tasks = job.gpus_per_node or job.tasks_per_node
    workdir = job.workdir.resolve()
    directives = [
        f"--job-name={JOB_NAME}",
        f"--partition={job.partition}",
        f"--nodes={job.nodes}",
        f"--ntasks-per-node={tasks}",
        f"--time={job.time}",
        f"--signal=TERM@{job.drain_seconds}",
        f"--output={workdir}/slurm-%j.out",
    ]
    if job.account:
        directives.append(f"--account={job.account}")
    if job.gpus_per_node:
        directives.append(f"--gpus-per-node={job.gpus_per_node}")
    task_id = "$SLURM_JOB_ID-$SLURM_PROCID"
    host = "\"$(hostname -I | cut -d' ' -f1)\"" if job.listen_host == "node" else shlex.quote(job.listen_host)
    worker = [
        *map(shlex.quote, essaim), "worker", "join", "--coordinator", shlex.quote(job.coordinator),
        "--institution", shlex.quote(job.institution), "--trust-class", "hpc", "--host", host,
        "--name", f'"slurm-{task_id}"', "--identity", f'"{workdir}/keys/slurm-{task_id}.key"',
    ]
    if job.checkpoints:
        worker += ["--checkpoint-dir", f'"{workdir}/checkpoints/$SLURM_PROCID"']
    srun = ["srun", "--kill-on-bad-exit=0"] + (["--gpus-per-task=1"] if job.gpus_per_node else [])
    return "\n".join([
        "#!/bin/bash",
        "# Written by `essaim hpc submit`: one Essaim worker per Slurm task. Each worker declares the job id",
        "# and the walltime to the coordinator; Slurm's SIGTERM before the walltime makes it report and leave.",
        *(f"#SBATCH {directive}" for directive in directives),
        "",
        f"mkdir -p {shlex.quote(str(workdir))}/keys",
        "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}",
        # One shell per task, so each expands its own SLURM_PROCID; exec makes the worker the task itself.
        f"{' '.join(srun)} bash -c {shlex.quote('exec ' + ' '.join(worker))}",
        "",
    ])


def submit(job: SlurmJob, env: dict[str, str] | None = None, essaim: list[str] | None = None) -> str:
    """Write the script into the job's workdir and sbatch it; returns the job id."""
    job.workdir.mkdir(parents=True, exist_ok=True)
    script = job.workdir / "essaim-worker.sbatch"
    script.write_text(render_sbatch(job, essaim))
    result = _run(["sbatch", "--parsable", str(script)], env)
    return result.stdout.strip().split(";")[0]


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    state: str        # PENDING, RUNNING, COMPLETED, CANCELLED, TIMEOUT, ...
    elapsed: str
    time_limit: str
    end_time: str     # when it ends (running: the walltime) or ended
    nodes: str


def job_status(job_ids: list[str] | None = None, env: dict[str, str] | None = None) -> list[JobStatus]:
    """Essaim worker jobs as `scontrol show job` describes them (finished ones too, while Slurm remembers)."""
    result = _run(["scontrol", "show", "job", "-o", *(job_ids or [])], env, allow_empty=True)
    jobs = []
    for line in result.stdout.splitlines():
        fields = dict(field.split("=", 1) for field in line.split() if "=" in field)
        if fields.get("JobName") != JOB_NAME and not job_ids:
            continue
        jobs.append(JobStatus(
            job_id=fields.get("JobId", "?"), state=fields.get("JobState", "?"), elapsed=fields.get("RunTime", "?"),
            time_limit=fields.get("TimeLimit", "?"), end_time=fields.get("EndTime", "?"),
            nodes=fields.get("NodeList", "?"),
        ))
    return jobs


def _run(command: list[str], env: dict[str, str] | None, allow_empty: bool = False) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    except FileNotFoundError:
        raise SlurmError(f"{command[0]} is not installed here: run this on a Slurm login node") from None
    if result.returncode != 0:
        if allow_empty and "Invalid job id" not in result.stderr and not result.stderr.strip():
            return result
        raise SlurmError(f"{' '.join(command[:2])} failed: {result.stderr.strip() or result.stdout.strip()}")
    return result
