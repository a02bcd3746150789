"""The sbatch script `essaim hpc submit` writes: what each Slurm task gets, with GPUs and without."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from coordinator.hpc import SlurmError, SlurmJob, render_sbatch
from essaim.processes import essaim_command


def job(**fields: object) -> SlurmJob:
    return SlurmJob(**{"coordinator": "c:1", "partition": "p", "nodes": 2, "time": "01:00:00",
                       "workdir": Path("/shared/run"), **fields})  # type: ignore[arg-type]


def directives(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


def srun_and_worker(script: str) -> tuple[list[str], list[str]]:
    """srun's options, and the worker command each task's shell execs."""
    [line] = [line for line in script.splitlines() if line.startswith("srun ")]
    *srun, bash, dash_c, command = shlex.split(line)
    assert (bash, dash_c) == ("bash", "-c")
    exec_, *worker = shlex.split(command)
    assert exec_ == "exec"
    return srun[1:], worker


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_a_gpu_job_runs_one_task_per_gpu_each_with_its_own_gpu_eight_cpus_and_cuda() -> None:
    script = render_sbatch(job(gpus_per_node=4, tasks_per_node=3), essaim=["essaim"])
    asked = directives(script)
    assert {"--nodes=2", "--ntasks-per-node=4", "--gpus-per-task=1", "--cpus-per-task=8"} <= set(asked)
    assert not any(directive.startswith("--gpus-per-node") for directive in asked)
    srun, worker = srun_and_worker(script)
    assert srun == ["--kill-on-bad-exit=0", "--gpus-per-task=1", "--cpus-per-task=8"]
    assert worker[:3] == ["essaim", "worker", "join"] and option(worker, "--device") == "cuda"
    assert "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}" in script.splitlines()


def test_cpus_per_task_replaces_the_gpu_default_in_sbatch_and_in_srun() -> None:
    script = render_sbatch(job(gpus_per_node=8, cpus_per_task=12))
    assert "--cpus-per-task=12" in directives(script)
    srun, _ = srun_and_worker(script)
    assert "--cpus-per-task=12" in srun and "--cpus-per-task=8" not in script


def test_a_cpu_job_asks_for_no_gpu_and_its_workers_train_on_the_cpu() -> None:
    script = render_sbatch(job(tasks_per_node=2))
    asked = directives(script)
    assert "--ntasks-per-node=2" in asked
    assert not any("gpu" in directive or "cpus-per-task" in directive for directive in asked)
    srun, worker = srun_and_worker(script)
    assert srun == ["--kill-on-bad-exit=0"]
    assert option(worker, "--device") == "cpu"
    assert "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}" in script.splitlines()


def test_a_cpu_job_given_cpus_per_task_gets_them_in_sbatch_and_in_srun_and_still_no_gpu() -> None:
    script = render_sbatch(job(tasks_per_node=2, cpus_per_task=4))
    assert "--cpus-per-task=4" in directives(script)
    srun, worker = srun_and_worker(script)
    assert srun == ["--kill-on-bad-exit=0", "--cpus-per-task=4"]
    assert option(worker, "--device") == "cpu" and "gpu" not in " ".join(directives(script))


@pytest.mark.parametrize("fields", [{"gpus_per_node": 4}, {"tasks_per_node": 2}], ids=["gpu", "cpu"])
def test_the_rendered_script_is_valid_bash(fields: dict[str, int], tmp_path: Path) -> None:
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(job(listen_host="node", institution="GENCI Jean Zay", **fields)))
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr


def test_a_negative_cpus_per_task_is_refused_with_what_to_give_instead() -> None:
    with pytest.raises(SlurmError, match=r"--cpus-per-task -1: give a number of CPUs per worker, or 0"):
        job(gpus_per_node=4, cpus_per_task=-1)
    result = subprocess.run(
        essaim_command("hpc", "submit", "--coordinator", "c:1", "--partition", "p", "--time", "01:00:00",
                       "--gpus-per-node", "4", "--cpus-per-task", "-1", "--dry-run"),
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and "--cpus-per-task" in result.stderr and "#SBATCH" not in result.stdout
