"""Slurm: an sbatch script that starts one Essaim worker per task, and what squeue/scontrol say of such jobs.

Each worker finds its job id (SLURM_JOB_ID) and its allocation's end (scontrol's
EndTime) itself and declares them at Register, so the coordinator never leases it
tokens it cannot train before the walltime. Slurm sends every task SIGTERM
``drain_seconds`` before the walltime (--signal): the workers report what they
trained, release the rest of their leases, and leave.

Who they train for: a worker is credited to an institution only with that
institution's certificate of its key (protocol/certificates.py). Given the
institution's key (``TaskCertificates``), the login node makes an identity and a
certificate for every task of the job before submitting it, so the institution's
private key never reaches the compute nodes; without it the tasks join as volunteers.

What each task gets: with GPUs (``--gpus-per-node N``) a node runs N tasks, and
each has one GPU of its own (Slurm sets its CUDA_VISIBLE_DEVICES to that GPU, so
the worker's ``--device cuda`` is it), ``cpus_per_task`` CPUs (8 unless told) and
as many OpenMP threads. Without GPUs a node runs ``tasks_per_node`` tasks with
``--device cpu``, so no task reaches for a GPU that is not its own.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.certificates import certify
from protocol.identity import Identity

JOB_NAME = "essaim-worker"
_WALLTIME = re.compile(r"^(\d+-)?\d{1,2}:\d{2}:\d{2}$")
# CPUs per GPU task unless told: data loading, the host-side DiLoCo outer step and hivemind's
# averaging each want a few cores, and GPU nodes commonly have 8 or more cores per GPU.
CPUS_PER_GPU_TASK = 8


class SlurmError(Exception):
    """A Slurm command failed or a job description is invalid; the message says which and why."""


@dataclass(frozen=True)
class TaskCertificates:
    """One identity and one certificate (class hpc) per task of a submission, in a directory of their own."""

    directory: Path          # task-N.key and task-N.cert for N = SLURM_PROCID
    institution: str         # the name the run admits the key under
    key: Ed25519PrivateKey   # the institution's: used on the login node only
    days: int

    @classmethod
    def for_submission(cls, workdir: Path, institution: str, key: Ed25519PrivateKey, days: int) -> "TaskCertificates":
        if not institution:
            raise SlurmError("--institution-key needs --institution NAME: the name the run admits that key under")
        # A directory per submission: two jobs of one workdir never share a worker identity.
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"
        return cls(workdir.resolve() / "keys" / f"submission-{stamp}", institution, key, days)

    def identity(self, task: str) -> Path:
        return self.directory / f"task-{task}.key"

    def certificate(self, task: str) -> Path:
        return self.directory / f"task-{task}.cert"

    def write(self, tasks: int) -> None:
        """Make each task's key (owner-only) and the institution's certificate of it."""
        expires_at = int(time.time()) + self.days * 86400
        for task in map(str, range(tasks)):
            worker = Identity.load_or_create(self.identity(task))
            self.certificate(task).write_bytes(
                certify(self.institution, self.key, worker.public_key, "hpc", expires_at).to_bytes())


@dataclass(frozen=True)
class SlurmJob:
    coordinator: str               # HOST:PORT the workers join
    partition: str
    nodes: int
    time: str                      # walltime, [D-]HH:MM:SS
    workdir: Path                  # keys, logs and checkpoints go here (a shared file system)
    account: str = ""
    gpus_per_node: int = 0         # > 0: one worker per GPU, each bound to its own GPU
    tasks_per_node: int = 1        # workers per node when there are no GPUs
    cpus_per_task: int = 0         # 0: CPUS_PER_GPU_TASK with GPUs, Slurm's default (1) without
    institution: str = ""          # claimed; credited only with `certificates`
    listen_host: str = "127.0.0.1"  # where each worker's hivemind peer listens; "node": the node's first address
    drain_seconds: int = 120       # SIGTERM this long before the walltime
    checkpoints: bool = True
    certificates: TaskCertificates | None = None  # None: each task makes a key and joins as a volunteer

    def __post_init__(self) -> None:
        if not _WALLTIME.match(self.time):
            raise SlurmError(f"--time {self.time!r}: write the walltime as HH:MM:SS or D-HH:MM:SS")
        if self.nodes < 1 or self.tasks_per_node < 1 or self.gpus_per_node < 0:
            raise SlurmError("--nodes and tasks per node must be at least 1, --gpus-per-node at least 0")
        if self.cpus_per_task < 0:
            raise SlurmError(f"--cpus-per-task {self.cpus_per_task}: give a number of CPUs per worker, "
                             f"or 0 for {CPUS_PER_GPU_TASK} per GPU worker and Slurm's default without GPUs")
        if not self.partition:
            raise SlurmError("--partition is required: name the partition to run on (sinfo lists them)")

    @property
    def tasks(self) -> int:
        """Workers per node: one per GPU, else tasks_per_node."""
        return self.gpus_per_node or self.tasks_per_node

    @property
    def task_cpus(self) -> int:
        """CPUs (and OpenMP threads) each worker gets; 0 leaves it to Slurm."""
        if self.cpus_per_task or not self.gpus_per_node:
            return self.cpus_per_task
        return CPUS_PER_GPU_TASK


def render_sbatch(job: SlurmJob, essaim: list[str] | None = None) -> str:
    """The batch script for ``job``; ``essaim`` is the command that runs Essaim on the nodes.

    Each task runs one worker. With GPUs, each task gets one GPU of its own as its
    CUDA_VISIBLE_DEVICES, ``job.task_cpus`` CPUs and as many OpenMP threads, and its
    worker trains with ``--device cuda``; without GPUs, its worker trains with ``--device cpu``.
    """
    workdir = job.workdir.resolve()
    worker = _worker_command(job, essaim or [sys.executable, "-m", "essaim"], workdir)
    return "\n".join([
        "#!/bin/bash",
        "# Written by `essaim hpc submit`: one Essaim worker per Slurm task. Each worker declares the job id",
        "# and the walltime to the coordinator; Slurm's SIGTERM before the walltime makes it report and leave.",
        _what_each_task_gets(job),
        *(f"#SBATCH {directive}" for directive in _directives(job, workdir)),
        "",
        f"mkdir -p {shlex.quote(str(workdir))}/keys",
        "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}",
        # One shell per task, so each expands its own SLURM_PROCID; exec makes the worker the task itself.
        f"{' '.join(_srun(job))} bash -c {shlex.quote('exec ' + ' '.join(worker))}",
        "",
    ])


def _what_each_task_gets(job: SlurmJob) -> str:
    cpus = f"{job.task_cpus} CPUs and {job.task_cpus} OpenMP threads" if job.task_cpus else "one OpenMP thread"
    if job.gpus_per_node:
        return f"# Each task: one GPU of its own (its CUDA_VISIBLE_DEVICES, --device cuda), {cpus}."
    return f"# Each task: no GPU (--device cpu), {cpus}."


def _directives(job: SlurmJob, workdir: Path) -> list[str]:
    directives = [
        f"--job-name={JOB_NAME}",
        f"--partition={job.partition}",
        f"--nodes={job.nodes}",
        f"--ntasks-per-node={job.tasks}",
        f"--time={job.time}",
        f"--signal=TERM@{job.drain_seconds}",
        f"--output={workdir}/slurm-%j.out",
    ]
    if job.account:
        directives.append(f"--account={job.account}")
    if job.gpus_per_node:
        # Asked per task, not per node: with --ntasks-per-node=N this already is N GPUs a node, and a
        # --gpus-per-node too would say that count twice. srun below binds each task to its own GPU.
        directives.append("--gpus-per-task=1")
    if job.task_cpus:
        directives.append(f"--cpus-per-task={job.task_cpus}")
    return directives


def _srun(job: SlurmJob) -> list[str]:
    srun = ["srun", "--kill-on-bad-exit=0"]
    if job.gpus_per_node:
        # Implies --gpu-bind=per_task:1 (Slurm 22.05+): exactly one GPU per task, as its CUDA_VISIBLE_DEVICES.
        # closest may bind a task to every GPU of its NUMA node; single:1 needs gres.conf's core affinity.
        srun.append("--gpus-per-task=1")
    if job.task_cpus:
        # srun 22.05 to 23.02 does not inherit sbatch's --cpus-per-task (23.11 does again), and an
        # inherited value that disagrees with SLURM_TRES_PER_TASK is fatal: say it on every version.
        srun.append(f"--cpus-per-task={job.task_cpus}")
    return srun


def _worker_command(job: SlurmJob, essaim: list[str], workdir: Path) -> list[str]:
    task_id = "$SLURM_JOB_ID-$SLURM_PROCID"
    host = "\"$(hostname -I | cut -d' ' -f1)\"" if job.listen_host == "node" else shlex.quote(job.listen_host)
    # A GPU task sees only its own GPU, so cuda is that GPU; a CPU task must not take a GPU it was not given.
    device = "cuda" if job.gpus_per_node else "cpu"
    worker = [
        *map(shlex.quote, essaim), "worker", "join", "--coordinator", shlex.quote(job.coordinator),
        *(["--institution", shlex.quote(job.institution)] if job.institution else []),
        "--host", host, "--device", device, "--name", f'"slurm-{task_id}"',
    ]
    if job.certificates is not None:
        task = "$SLURM_PROCID"
        worker += ["--identity", f'"{job.certificates.identity(task)}"',
                   "--certificate", f'"{job.certificates.certificate(task)}"']
    else:
        worker += ["--identity", f'"{workdir}/keys/slurm-{task_id}.key"']
    if job.checkpoints:
        worker += ["--checkpoint-dir", f'"{workdir}/checkpoints/$SLURM_PROCID"']
    return worker


def submit(job: SlurmJob, env: dict[str, str] | None = None, essaim: list[str] | None = None) -> str:
    """Write the script into the job's workdir and sbatch it; returns the job id."""
    job.workdir.mkdir(parents=True, exist_ok=True)
    if job.certificates is not None:
        job.certificates.write(job.nodes * job.tasks)
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
