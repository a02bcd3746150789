"""`essaim worker join` refuses a device it cannot use, or a run it cannot fit, before it registers."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from sqlalchemy import func, select

from coordinator.store import Lease, Worker
from essaim.processes import essaim_command

pytestmark = pytest.mark.e2e


def join(coordinator, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run(
        essaim_command("worker", "join", "--coordinator", coordinator.address, "--identity", str(tmp_path / "w.key"),
                       "--connect-seconds", "5", *args),
        capture_output=True, text=True, timeout=120,
    )


def registered(coordinator) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    with coordinator.sessions()() as session:
        return session.scalar(select(func.count(Worker.id))), session.scalar(select(func.count(Lease.id)))


def test_a_worker_is_refused_before_register_when_it_asks_for_cuda_here_or_the_model_cannot_fit(
    start_coordinator, tmp_path: Path
) -> None:
    # 16384 rows of 1024 tokens per pass: tens of GiB of activations, more than this machine has.
    coordinator = start_coordinator(batch_size=16384, seq_len=1024, inner_steps=1)

    too_big = join(coordinator, tmp_path, "--device", "cpu")
    assert too_big.returncode == 2, too_big.stderr
    assert "preset 'tiny' needs about" in too_big.stderr and "--micro-batch-size " in too_big.stderr

    if not torch.cuda.is_available():
        no_cuda = join(coordinator, tmp_path, "--device", "cuda")
        assert no_cuda.returncode == 2
        assert "--device cuda: PyTorch sees no CUDA device here" in no_cuda.stderr
        assert "use --device cpu (or auto)" in no_cuda.stderr
    assert registered(coordinator) == (0, 0)  # nobody joined, nothing was leased
