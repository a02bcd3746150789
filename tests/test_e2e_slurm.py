"""A real single-node Slurm: `essaim hpc submit` runs workers as job tasks (they declare the job, drain on
SIGTERM), and `essaim data prepare --executor slurm` runs corpus preparation as job arrays.

The HPC centre (GENCI) holds a key the coordinator admits; `hpc submit` certifies each
task's worker with it on the login node, so the workers are credited as GENCI's, class hpc.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import signal
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import select

from coordinator.accounting import accounting_problems
from coordinator.hpc import job_status
from coordinator.store import Contribution, Lease, Worker
from essaim.processes import essaim_command
from governance.documents import generate_key
from model.corpus import REPORT_FILE, ExecutorSettings, prepare_corpus
from model.corpus_config import load_corpus_config
from model.shards import Manifest
from model.synthetic_corpus import write_synthetic_corpus
from slurm import SlurmCluster, slurm_available
from support import wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not slurm_available(), reason="a private Slurm needs root and Debian's slurm-wlm and munge"),
]


@pytest.fixture(scope="module")
def slurm():
    cluster = SlurmCluster()
    yield cluster
    cluster.stop()


def essaim(slurm: SlurmCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(essaim_command(*args), capture_output=True, text=True, env=slurm.env, timeout=120)


@pytest.fixture
def start_admitting_coordinator(start_coordinator, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A coordinator that admits GENCI's key (tmp_path/genci.key)."""
    genci = generate_key(tmp_path / "genci.key")
    return lambda **run: start_coordinator(extra=(f"--admit-institution=GENCI={genci}",), **run)


def submit(slurm: SlurmCluster, coordinator, workdir: Path, time: str) -> str:  # type: ignore[no-untyped-def]
    result = essaim(slurm, "hpc", "submit", "--coordinator", coordinator.address, "--partition", "debug",
                    "--nodes", "1", "--tasks-per-node", "2", "--time", time, "--workdir", str(workdir),
                    "--institution", "GENCI", "--institution-key", str(workdir.parent / "genci.key"))
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split()[-1]


def job_state(slurm: SlurmCluster, job_id: str) -> str:
    [job] = job_status([job_id], env=slurm.env)
    return job.state


def test_a_job_runs_two_workers_that_declare_the_job_and_its_walltime(slurm, start_admitting_coordinator,
                                                                      tmp_path: Path) -> None:
    coordinator = start_admitting_coordinator(total_rounds=3, target_group_size=2, inner_steps=10, batch_size=4,
                                              seq_len=64, matchmaking_seconds=5.0, heartbeat_seconds=1)
    job_id = submit(slurm, coordinator, tmp_path / "job", "00:10:00")
    wait_for(lambda: job_state(slurm, job_id) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 240, "the job to end")
    output = (tmp_path / "job" / f"slurm-{job_id}.out").read_text()
    assert job_state(slurm, job_id) == "COMPLETED", output[-3000:] + slurm.logs()

    status = essaim(slurm, "hpc", "status", "--job", job_id)
    assert status.returncode == 0 and job_id in status.stdout and "COMPLETED" in status.stdout
    with coordinator.sessions()() as session:
        workers = session.scalars(select(Worker)).all()
    assert sorted(w.name for w in workers) == [f"slurm-{job_id}-0", f"slurm-{job_id}-1"]
    for worker in workers:  # credited by the certificates made at submission, not by what the tasks typed
        assert (worker.slurm_job_id, worker.trust_class, worker.institution) == (job_id, "hpc", "GENCI")
        started = dt.datetime.fromtimestamp(worker.registered_at)
        assert dt.timedelta(minutes=9) < dt.datetime.fromtimestamp(worker.available_until) - started < dt.timedelta(minutes=11)
    assert "not credited" not in output
    assert sorted(p.name for p in (tmp_path / "job" / "keys").rglob("*.cert")) == ["task-0.cert", "task-1.cert"]
    with coordinator.sessions()() as session:
        reported = sorted((c.round, c.worker_id) for c in session.scalars(select(Contribution)))
    assert [r for r, _ in reported] == [0, 0, 1, 1, 2, 2]  # both tasks trained every round
    assert accounting_problems(coordinator.sessions()) == []


def test_sigterm_before_the_walltime_makes_the_workers_release_their_leases(slurm, start_admitting_coordinator,
                                                                            tmp_path: Path) -> None:
    coordinator = start_admitting_coordinator(total_rounds=100, target_group_size=2, inner_steps=400, batch_size=4,
                                              seq_len=64, lease_seconds=60, heartbeat_seconds=1)
    sessions = coordinator.sessions()
    job_id = submit(slurm, coordinator, tmp_path / "job", "00:10:00")

    def granted() -> list[Lease]:
        with sessions() as session:
            return session.scalars(select(Lease).where(Lease.state == "granted")).all()

    wait_for(lambda: len({lease.worker_id for lease in granted()}) == 2, 180, "both workers to hold leases")
    # What --signal=TERM@120 does two minutes before the walltime, now.
    assert slurm.run("scancel", "--signal=TERM", job_id).returncode == 0
    wait_for(lambda: job_state(slurm, job_id) not in ("RUNNING", "PENDING", "COMPLETING"), 120, "the job to end")
    output = (tmp_path / "job" / f"slurm-{job_id}.out").read_text()
    assert granted() == [], output[-3000:]
    with sessions() as session:
        states = {lease.state for lease in session.scalars(select(Lease))}
    assert "released" in states and "expired" not in states, output[-3000:]
    assert output.count("releasing the lease and leaving the swarm") == 2, output[-3000:]
    assert output.count(" stopped after ") == 2, output[-3000:]
    assert accounting_problems(sessions) == []


def test_prepare_on_slurm_equals_the_local_executor_and_a_stop_cancels_its_jobs(slurm, tmp_path: Path) -> None:
    config = write_synthetic_corpus(tmp_path / "in", megabytes=0.3, seed=3)
    sizes = ("--vocab-size", "500", "--shard-tokens", "8000")
    on_slurm = ("--executor", "slurm", "--partition", "debug", "--tasks", "2")

    dry = essaim(slurm, "data", "prepare", str(config), "--out", str(tmp_path / "dry"), *on_slurm, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count("#!/bin/bash") == 11 and dry.stdout.count("--dependency=afterok") == 10
    assert "#SBATCH --array=0-1" in dry.stdout and "launch_pickled_pipeline" in dry.stdout
    assert not slurm.run("squeue", "-h").stdout.strip()  # nothing submitted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # nothing left behind

    result = essaim(slurm, "data", "prepare", str(config), "--out", str(tmp_path / "slurm"), *on_slurm, *sizes)
    assert result.returncode == 0, result.stderr + slurm.logs()
    assert "submitted 11 Slurm job arrays" in result.stderr
    local, report = prepare_corpus(load_corpus_config(config), tmp_path / "local", vocab_size=500, shard_tokens=8000,
                                   executor=ExecutorSettings(tasks=2))
    assert Manifest.load(tmp_path / "slurm" / "manifest.json") == local
    assert json.loads((tmp_path / "slurm" / REPORT_FILE).read_text()) == report.to_json()
    assert not (tmp_path / ".slurm.prepare").exists()

    stopping = config.with_name("stopping.toml")
    stopping.write_text(config.read_text().replace('on_bad_record = "skip"', 'on_bad_record = "stop"'))
    stopped = essaim(slurm, "data", "prepare", str(stopping), "--out", str(tmp_path / "stopped"), *on_slurm, *sizes)
    assert stopped.returncode != 0
    assert "jsonl:5: not valid JSON" in stopped.stderr and "nothing was written" in stopped.stderr
    wait_for(lambda: not slurm.run("squeue", "-h").stdout.strip(), 30, "the later stages cancelled")
    assert not (tmp_path / "stopped").exists() and not (tmp_path / ".stopped.prepare").exists()


def test_prepare_on_slurm_resumes_after_its_command_was_interrupted(slurm, tmp_path: Path) -> None:
    config = write_synthetic_corpus(tmp_path / "in", megabytes=0.3, seed=4)
    args = ("data", "prepare", str(config), "--out", str(tmp_path / "data"), "--executor", "slurm", "--partition",
            "debug", "--tasks", "2", "--vocab-size", "500")
    first = subprocess.Popen(essaim_command(*args), env=slurm.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    completions = tmp_path / ".data.prepare" / "logs" / "filter" / "completions"
    wait_for(lambda: completions.is_dir() and len(list(completions.iterdir())) == 2, 60, "the filter stage done")
    first.send_signal(signal.SIGINT)  # the login session ends; the jobs go on
    _, stderr = first.communicate(timeout=60)
    assert first.returncode != 0 and "interrupted: the Slurm jobs" in stderr and "Run the same command again" in stderr

    second = essaim(slurm, *args)
    assert second.returncode == 0, second.stderr + slurm.logs()
    waited = "are still queued or running: waiting for them" in second.stderr
    resubmitted = re.search(r"submitted (\d+) Slurm job arrays .*; (\d+) stages had finished before", second.stderr)
    assert waited or (resubmitted and int(resubmitted[2]) >= 1), second.stderr  # the filter stage ran once
    local, _ = prepare_corpus(load_corpus_config(config), tmp_path / "local", vocab_size=500,
                              executor=ExecutorSettings(tasks=2))
    assert Manifest.load(tmp_path / "data" / "manifest.json") == local
    assert not slurm.run("squeue", "-h").stdout.strip()
