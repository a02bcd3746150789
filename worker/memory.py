"""Will the run's model fit on this worker? An estimate made before joining, and a refusal that says what to do.

Training memory, per trainable parameter: float32 weights (4 bytes), gradients (4)
and AdamW's two moments (8), plus a bf16 copy of the weights (2) that autocast
keeps for the forward. The DiLoCo outer state lives in host memory: global
parameters, momentum, the local parameters' host copy and the averager's buffer
(4 bytes each), one more with error feedback. Activations grow with the tokens
of one micro-batch; the per-token figures below are upper bounds of what
autograd saves in a Llama layer (measured on CPU with saved-tensor hooks: 83h
bytes in fp32 for h = 64 and 512, with intermediate 2.7h), plus the logits,
their float32 copy and their gradient (~10 bytes per vocabulary entry per token).
At the 1b preset, 8 x 2048 tokens, this gives 61 GiB; an H200 peaked at 58 GiB.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.presets import llama_config, parameter_count
from worker.device import DevicePlan, host_available_bytes

GIB = 1 << 30
HEADROOM = 0.9  # leave a tenth of free memory to the allocator's fragmentation, the CUDA context, the OS


@dataclass(frozen=True)
class TrainingShape:
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


def activation_bytes_per_token(shape: TrainingShape, precision: str) -> int:
    config = llama_config(shape.preset, shape.vocab_size)
    kv_width = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    per_layer = 9 * config.hidden_size + 4 * config.intermediate_size + 2 * kv_width
    bytes_per_value = 4.0 if precision == "fp32" else 2.75  # autocast keeps some float32 (norms, residuals)
    return int(config.num_hidden_layers * per_layer * bytes_per_value + 10 * shape.vocab_size + 12 * config.hidden_size)


def estimate(shape: TrainingShape, precision: str) -> MemoryEstimate:
    parameters = parameter_count(shape.preset, shape.vocab_size)
    per_parameter = 16 + (2 if precision == "bf16" else 0)
    activations = shape.rows_per_pass * shape.seq_len * activation_bytes_per_token(shape, precision)
    outer = 4 * parameters * (4 + shape.error_feedback)
    return MemoryEstimate(parameters, per_parameter * parameters + activations, outer)


def check_fits(shape: TrainingShape, plan: DevicePlan) -> MemoryEstimate:
    """The estimate if the run fits this worker's free memory; DoesNotFit with what to do otherwise."""
    needed = estimate(shape, plan.precision)
    device_free = int(plan.free_bytes() * HEADROOM)
    host_free = int(host_available_bytes() * HEADROOM)
    if plan.is_cuda:
        if needed.device_bytes > device_free:
            raise DoesNotFit(_advice(shape, plan, needed.device_bytes, device_free, f"{plan.device} ({plan.name})"))
        if needed.host_bytes > host_free:
            raise DoesNotFit(
                f"preset {shape.preset!r} ({needed.parameters / 1e6:,.0f} M parameters) keeps its DiLoCo outer state "
                f"in host memory: {_gib(needed.host_bytes)} needed, {_gib(host_free)} available; "
                "free host memory, or join from a machine with more"
            )
    elif needed.device_bytes + needed.host_bytes > device_free:
        raise DoesNotFit(_advice(shape, plan, needed.device_bytes + needed.host_bytes, device_free, "this machine's RAM"))
    return needed


def largest_micro_batch(shape: TrainingShape, plan: DevicePlan, available: int) -> int:
    """The most rows per pass whose estimate fits in `available` bytes (0: not even one row)."""
    fixed = estimate(TrainingShape(shape.preset, shape.vocab_size, shape.seq_len, 1, 1, shape.error_feedback),
                     plan.precision)
    per_row = shape.seq_len * activation_bytes_per_token(shape, plan.precision)
    budget = available - (fixed.device_bytes - per_row) - (0 if plan.is_cuda else fixed.host_bytes)
    return max(0, min(shape.batch_size, budget // per_row))


def _advice(shape: TrainingShape, plan: DevicePlan, needed: int, available: int, where: str) -> str:
    fits = largest_micro_batch(shape, plan, available)
    if 0 < fits < shape.rows_per_pass:
        what_to_do = (f"ask the run's operator for micro_batch_size = {fits} (or less) in the run settings: each "
                      f"batch of {shape.batch_size} rows then trains in passes, to the same result")
    else:
        what_to_do = "even one row per pass does not fit: join with a device that has more memory" + (
            "" if plan.is_cuda else ", or a GPU (--device cuda)")
    return (f"preset {shape.preset!r} needs about {_gib(needed)} to train {shape.rows_per_pass} rows of "
            f"{shape.seq_len} tokens per pass in {plan.precision} on {where}, which has {_gib(available)} free; "
            f"{what_to_do}")


def _gib(value: int) -> str:
    return f"{value / GIB:.1f} GiB"
