"""`essaim hpc`: Slurm jobs of workers (coordinator/hpc.py), submitted from a login node, and their state."""

from __future__ import annotations

from pathlib import Path

import typer

from essaim.cli_support import fail as _fail

hpc_app = typer.Typer(no_args_is_help=True, help="Run workers as Slurm jobs.")


@hpc_app.command("submit")
def hpc_submit(
    coordinator: str = typer.Option(..., help="HOST:PORT of the coordinator, as the compute nodes reach it."),
    partition: str = typer.Option(..., help="The Slurm partition (sinfo lists them)."),
    nodes: int = typer.Option(1, min=1),
    time: str = typer.Option(..., "--time", help="Walltime, HH:MM:SS or D-HH:MM:SS."),
    account: str = typer.Option("", help="The project account to charge, where the centre asks for one."),
    gpus_per_node: int = typer.Option(0, min=0, help="> 0: one worker per GPU, each bound to its own GPU."),
    tasks_per_node: int = typer.Option(1, min=1, help="Workers per node when there are no GPUs."),
    cpus_per_task: int = typer.Option(
        0, min=0, help="CPUs (and OpenMP threads) per worker; 0: 8 per GPU worker, Slurm's default without GPUs."
    ),
    workdir: Path = typer.Option(Path("essaim-slurm"), help="Shared directory for keys, logs and checkpoints."),
    institution: str = typer.Option("", help="The institution the workers train for, as the run admits it."),
    institution_key: Path | None = typer.Option(
        None, help="The institution's private key: each task's worker gets a certificate of class hpc, made here "
                   "(the key never reaches the nodes). Without it the workers join as volunteers."),
    certificate_days: int = typer.Option(30, min=1, help="How long the tasks' certificates stay valid."),
    listen_host: str = typer.Option(
        "127.0.0.1", help="Where each worker's hivemind peer listens; 'node': each node's first address."
    ),
    drain_seconds: int = typer.Option(120, min=10, help="SIGTERM the workers this long before the walltime."),
    dry_run: bool = typer.Option(False, help="Print the sbatch script instead of submitting it."),
) -> None:
    """Submit a Slurm job that starts one worker per task (srun), each tagged with the job id and walltime.

    With --gpus-per-node N, each node runs N workers and each has one GPU of its own (--device cuda).
    With --institution-key, each task joins with an identity and a certificate made for it here.
    """
    from coordinator.hpc import SlurmError, SlurmJob, TaskCertificates, render_sbatch, submit
    from governance.documents import GovernanceError, load_key

    try:
        certificates = TaskCertificates.for_submission(
            workdir, institution, load_key(institution_key), certificate_days) if institution_key else None
        job = SlurmJob(
            coordinator=coordinator, partition=partition, nodes=nodes, time=time, workdir=workdir, account=account,
            gpus_per_node=gpus_per_node, tasks_per_node=tasks_per_node, cpus_per_task=cpus_per_task,
            institution=institution, listen_host=listen_host, drain_seconds=drain_seconds, certificates=certificates,
        )
        if dry_run:
            typer.echo(render_sbatch(job), nl=False)
            return
        job_id = submit(job)
    except (SlurmError, GovernanceError) as error:
        _fail(str(error))
    typer.echo(f"submitted Slurm job {job_id}")


@hpc_app.command("status")
def hpc_status(job: list[str] = typer.Option([], "--job", help="Job ids (default: every essaim-worker job).")) -> None:
    """Essaim worker jobs as Slurm sees them: state, run time, time limit, end time, nodes."""
    from rich.console import Console
    from rich.table import Table

    from coordinator.hpc import SlurmError, job_status

    try:
        jobs = job_status(job)
    except SlurmError as error:
        _fail(str(error))
    table = Table("job", "state", "run time", "time limit", "ends", "nodes")
    for status in jobs:
        table.add_row(status.job_id, status.state, status.elapsed, status.time_limit, status.end_time, status.nodes)
    Console(width=120).print(table)
