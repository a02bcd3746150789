"""What a worker tells the coordinator about itself: device, precision, memory, speed, and until when it is here.

The device and precision come from the worker's DevicePlan (worker/device.py).
Throughput comes from a short calibration run of the real inner step on the
device the worker trains on; the allocation's end comes from Slurm when the
worker runs inside a Slurm job and was not told otherwise.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import time
from dataclasses import dataclass

import torch

from worker.device import DevicePlan
from worker.step import inner_optimizer, inner_step

CALIBRATION_STEPS = 3  # the first step warms up (allocations, kernels) and is not timed


@dataclass(frozen=True)
class Capabilities:
    device: str              # "cuda:0 NVIDIA H200", "cpu AMD EPYC 9654 x16"
    memory_bytes: int        # of the device that trains
    trust_class: str         # claimed (hpc, institution or volunteer); only an institution's certificate grants one
    available_until: float   # unix seconds; 0: open-ended
    slurm_job_id: str
    bandwidth_mbit: float    # 0: unknown
    precision: str = "fp32"  # what its matmuls compute in: fp32 or bf16 (autocast)


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


def detect(plan: DevicePlan, trust_class: str, available_until: float | None, bandwidth_mbit: float) -> Capabilities:
    """Capabilities from the device plan, the environment (SLURM_JOB_ID) and what the user said."""
    job_id = os.environ.get("SLURM_JOB_ID", "")
    if available_until is None:
        available_until = (slurm_job_end(job_id) or 0.0) if job_id else 0.0
    return Capabilities(plan.describe(), plan.memory_bytes, trust_class, available_until, job_id, bandwidth_mbit,
                        plan.precision)


def calibrate(
    model: torch.nn.Module, plan: DevicePlan, vocab_size: int, batch_size: int, seq_len: int, lr: float,
    micro_batch_size: int = 0,
) -> float:
    """Tokens per second of the real inner step on random tokens, on the model's device.

    It trains the model it is given, with a scratch optimizer: the caller puts the
    parameters back afterwards (DiLoCoTrainer.discard_local_progress), which costs
    no second copy of the model on a GPU that may just fit one.
    """
    optimizer = inner_optimizer([p for p in model.parameters() if p.requires_grad], lr, plan)
    generator = torch.Generator().manual_seed(0)
    started = 0.0
    for step in range(CALIBRATION_STEPS):
        if step == 1:  # the first step warms up (allocations, kernels, compilation) and is not timed
            plan.synchronize()
            started = time.perf_counter()
        batch = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
        loss = inner_step(model, optimizer, batch, plan, micro_batch_size)
    float(loss)  # waits for the device
    return (CALIBRATION_STEPS - 1) * batch_size * seq_len / (time.perf_counter() - started)
