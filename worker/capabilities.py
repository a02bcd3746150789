"""What a worker tells the coordinator about itself: device, memory, speed, and until when it is here.

Throughput comes from a short calibration run on a copy of the model (the real
parameters are not touched); the allocation's end comes from Slurm when the worker
runs inside a Slurm job and was not told otherwise.
"""

from __future__ import annotations

import copy
import datetime as dt
import os
import platform
import subprocess
import time
from dataclasses import dataclass

import torch

CALIBRATION_STEPS = 3  # the first step warms up (allocations, kernels) and is not timed


@dataclass(frozen=True)
class Capabilities:
    device: str
    memory_bytes: int
    trust_class: str         # hpc, institution or volunteer
    available_until: float   # unix seconds; 0: open-ended
    slurm_job_id: str
    bandwidth_mbit: float    # 0: unknown


def detect_device() -> tuple[str, int]:
    """("cuda:<name>" or "cpu:<model>", memory in bytes of that device)."""
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        return f"cuda:{properties.name}", int(properties.total_memory)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return f"cpu:{_cpu_model()} x{os.cpu_count()}", int(memory)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def slurm_job_end(job_id: str) -> float | None:
    """The job's end time (its walltime limit) from `scontrol`, as unix seconds; None if unknown."""
    try:
        result = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for field in result.stdout.split():
        if field.startswith("EndTime="):
            try:
                return dt.datetime.fromisoformat(field.split("=", 1)[1]).timestamp()  # local time, as Slurm prints it
            except ValueError:
                return None
    return None


def detect(trust_class: str, available_until: float | None, bandwidth_mbit: float) -> Capabilities:
    """Capabilities from the machine, the environment (SLURM_JOB_ID) and what the user said."""
    device, memory = detect_device()
    job_id = os.environ.get("SLURM_JOB_ID", "")
    if available_until is None:
        available_until = (slurm_job_end(job_id) or 0.0) if job_id else 0.0
    return Capabilities(device, memory, trust_class, available_until, job_id, bandwidth_mbit)


def calibrate(model: torch.nn.Module, vocab_size: int, batch_size: int, seq_len: int, lr: float) -> float:
    """Tokens per second of inner AdamW steps on random tokens, measured on a copy of the model."""
    scratch = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(scratch.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    timed = 0.0
    for step in range(CALIBRATION_STEPS):
        batch = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
        started = time.perf_counter()
        scratch(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            timed += time.perf_counter() - started
    return (CALIBRATION_STEPS - 1) * batch_size * seq_len / timed
