"""Will the run's model fit on this worker? An estimate made before joining, and a refusal that says what to do.

Training memory, per trainable parameter: float32 weights (4 bytes), gradients (4)
and AdamW's two moments (8), plus a bf16 copy of the weights (2) that autocast
keeps for the forward. The DiLoCo outer state lives in host memory: global
parameters, momentum, the averager's buffer and (from a GPU) the local parameters'
host copy, 4 bytes each, one more with error feedback: counted as 16 (20) everywhere. Activations grow with the tokens
of one micro-batch; the per-token figures below are upper bounds of what
autograd saves in a Llama layer (measured on CPU with saved-tensor hooks: 83h
bytes in fp32 for h = 64 and 512, with intermediate 2.7h), plus the logits,
their float32 copy and their gradient (~10 bytes per vocabulary entry per token).
At the 1b preset, 8 x 2048 tokens in bf16, this gives 64 GiB; an H200 peaked at 58 GiB.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from model.presets import llama_config, parameter_count
from worker.device import DevicePlan, host_available_bytes

GIB = 1 << 30
HEADROOM = 0.9  # leave a tenth of free memory to the allocator's fragmentation, the CUDA context, the OS


@dataclass(frozen=True)
class Workload:
    """The part of a run's config that sets a worker's memory (the coordinator's GetTrainingShape)."""

    preset: str
    vocab_size: int
    seq_len: int
    batch_size: int
    micro_batch_size: int = 0   # 0: batch_size
    error_feedback: bool = False

    @property
    def rows_per_pass(self) -> int:
        return self.micro_batch_size or self.batch_size


@dataclass(frozen=True)
class MemoryEstimate:
    parameters: int
    device_bytes: int   # model, gradients, AdamW, activations: where the inner steps run
    host_bytes: int     # the DiLoCo outer state (on the device too when the device is the CPU)


class DoesNotFit(Exception):
    """The run's model cannot train on this worker; the message names the preset, the bytes and what to do."""


def activation_bytes_per_token(workload: Workload, precision: str) -> int:
    config = llama_config(workload.preset, workload.vocab_size)
    kv_width = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    per_layer = 9 * config.hidden_size + 4 * config.intermediate_size + 2 * kv_width
    bytes_per_value = 4.0 if precision == "fp32" else 2.75  # autocast keeps some float32 (norms, residuals)
    return int(config.num_hidden_layers * per_layer * bytes_per_value + 10 * workload.vocab_size + 12 * config.hidden_size)


def estimate(workload: Workload, precision: str) -> MemoryEstimate:
    parameters = parameter_count(workload.preset, workload.vocab_size)
    per_parameter = 16 + (2 if precision == "bf16" else 0)
    activations = workload.rows_per_pass * workload.seq_len * activation_bytes_per_token(workload, precision)
    outer = 4 * parameters * (4 + workload.error_feedback)
    return MemoryEstimate(parameters, per_parameter * parameters + activations, outer)


def check_fits(workload: Workload, plan: DevicePlan) -> MemoryEstimate:
    """The estimate if the run fits this worker's free memory; DoesNotFit with what to do otherwise."""
    needed = estimate(workload, plan.precision)
    device_free = int(plan.free_bytes() * HEADROOM)
    host_free = int(host_available_bytes() * HEADROOM)
    if plan.is_cuda:
        if needed.device_bytes > device_free:
            raise DoesNotFit(_advice(workload, plan, needed.device_bytes, device_free, f"{plan.device} ({plan.name})"))
        if needed.host_bytes > host_free:
            raise DoesNotFit(
                f"preset {workload.preset!r} ({needed.parameters / 1e6:,.0f} M parameters) keeps its DiLoCo outer state "
                f"in host memory: {_gib(needed.host_bytes)} needed, {_gib(host_free)} available; "
                "free host memory, or join from a machine with more"
            )
    elif needed.device_bytes + needed.host_bytes > device_free:
        raise DoesNotFit(_advice(workload, plan, needed.device_bytes + needed.host_bytes, device_free, "this machine's RAM"))
    return needed


def largest_micro_batch(workload: Workload, plan: DevicePlan, available: int) -> int:
    """The most rows per pass whose estimate fits in `available` bytes (0: not even one row)."""
    fixed = estimate(Workload(workload.preset, workload.vocab_size, workload.seq_len, 1, 1, workload.error_feedback),
                     plan.precision)
    per_row = workload.seq_len * activation_bytes_per_token(workload, plan.precision)
    budget = available - (fixed.device_bytes - per_row) - (0 if plan.is_cuda else fixed.host_bytes)
    return max(0, min(workload.batch_size, budget // per_row))


class OutOfDeviceMemory(Exception):
    """Training ran out of device memory; the leases were released and the message says what to change."""


OUT_OF_MEMORY_SIGNS = ("can't allocate memory", "CUBLAS_STATUS_ALLOC_FAILED")


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA raises torch.OutOfMemoryError; the CPU allocator a RuntimeError that says it cannot allocate."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and any(sign in str(error) for sign in OUT_OF_MEMORY_SIGNS))


@contextlib.contextmanager
def out_of_memory_refused(plan: DevicePlan, workload: Workload) -> Iterator[None]:
    """Turn an out-of-memory error (after the round's leases were released) into advice on micro_batch_size."""
    try:
        yield
    except RuntimeError as error:  # torch.OutOfMemoryError is one
        if not is_out_of_memory(error):
            raise
        raise OutOfDeviceMemory(
            f"{plan.describe()} ran out of memory while training ({str(error).splitlines()[0][:160]}); "
            f"this worker's leases were released. Train fewer rows per pass: --micro-batch-size below "
            f"{workload.rows_per_pass} (or micro_batch_size in the run settings)"
        ) from None


def _advice(workload: Workload, plan: DevicePlan, needed: int, available: int, where: str) -> str:
    fits = largest_micro_batch(workload, plan, available)
    if 0 < fits < workload.rows_per_pass:
        what_to_do = (f"join with --micro-batch-size {fits} (or less), or ask the run's operator for that "
                      f"micro_batch_size in the run settings: each batch of {workload.batch_size} rows then trains "
                      "in passes, to the same result")
    else:
        what_to_do = "even one row per pass does not fit: join with a device that has more memory" + (
            "" if plan.is_cuda else ", or a GPU (--device cuda)")
    return (f"preset {workload.preset!r} needs about {_gib(needed)} to train {workload.rows_per_pass} rows of "
            f"{workload.seq_len} tokens per pass in {plan.precision} on {where}, which has {_gib(available)} free; "
            f"{what_to_do}")


def _gib(value: int) -> str:
    return f"{value / GIB:.1f} GiB"
