"""Every device and precision decision of a worker, made once (nanoGPT's `device` and `ctx`).

The agent calls plan_device() before it registers, so a worker declares what it
really trains on and a bad --device is refused before anything is leased. Master
weights stay float32 everywhere: bf16 is autocast only, and the DiLoCo outer step
runs on the host in float32 (worker/outer_state.py), so peers on different devices
and precisions end each round with bit-identical global parameters.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
from dataclasses import dataclass
from typing import ContextManager

import torch

from protocol.choices import PRECISIONS

DEVICES_HELP = "auto, cpu, cuda or cuda:N"
PRECISION_CHOICES = ("auto", *PRECISIONS)
_DEVICE = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


class DeviceError(ValueError):
    """A device or precision this machine cannot train with; the message says what to use instead."""


@dataclass(frozen=True)
class DevicePlan:
    device: torch.device
    precision: str       # "fp32" or "bf16": what matmuls compute in (autocast); weights are float32 either way
    name: str            # the hardware: "NVIDIA H200", "AMD EPYC 9654 x16"
    memory_bytes: int    # the device's total memory (the host's RAM for the CPU)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def pin_host_memory(self) -> bool:
        """Host tensors that cross to the device are pinned, so copies run asynchronously."""
        return self.is_cuda

    def describe(self) -> str:
        """What the worker declares at Register: "cuda:0 NVIDIA H200", "cpu AMD EPYC 9654 x16"."""
        return f"{self.device} {self.name}"

    def autocast(self) -> ContextManager[object]:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def to_device(self, batch: torch.Tensor) -> torch.Tensor:
        """A batch of token ids on the device; on CUDA the copy does not wait for the GPU."""
        if not self.is_cuda:
            return batch
        return batch.pin_memory().to(self.device, non_blocking=True)

    def synchronize(self) -> None:
        """Wait for the device's queued work (asynchronous copies included)."""
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def free_bytes(self) -> int:
        """Memory a new allocation can take now: free GPU memory, or the host's available RAM."""
        if self.is_cuda:
            free, _total = torch.cuda.mem_get_info(self.device)
            return int(free)
        return host_available_bytes()


def plan_device(device: str = "auto", precision: str = "auto") -> DevicePlan:
    """The device and precision to train with, from --device and --precision; DeviceError if impossible.

    auto picks the first CUDA device if there is one, else the CPU; precision auto
    is bf16 autocast on a CUDA device that supports it, float32 elsewhere.
    """
    match = _DEVICE.match(device.strip().lower())
    if match is None or (match.group(1) != "cuda" and match.group(2) is not None):
        raise DeviceError(f"--device {device!r}: use {DEVICES_HELP}")
    if precision not in PRECISION_CHOICES:
        raise DeviceError(f"--precision {precision!r}: use one of {', '.join(PRECISION_CHOICES)}")
    kind, index = match.group(1), match.group(2)
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cpu":
        return DevicePlan(torch.device("cpu"), "fp32" if precision == "auto" else precision,
                          f"{_cpu_model()} x{os.cpu_count()}", host_total_bytes())
    chosen = _cuda_device(int(index or 0), device)
    torch.cuda.set_device(chosen)  # pinned memory, fused kernels and the CUDA context all go to this GPU
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    elif precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"--precision bf16: {torch.cuda.get_device_name(chosen)} has no bf16 support; "
                          "use --precision fp32 (or auto)")
    # TF32 for the float32 matmuls autocast leaves (and all of them under fp32): ~10 bits of mantissa,
    # as much as bf16 keeps, at several times float32's speed on Ampere and newer.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    properties = torch.cuda.get_device_properties(chosen)
    return DevicePlan(chosen, precision, properties.name, int(properties.total_memory))


def _cuda_device(index: int, asked: str) -> torch.device:
    if not torch.cuda.is_available():
        built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise DeviceError(
            f"--device {asked}: PyTorch sees no CUDA device here (torch {torch.__version__}, {built}); "
            "use --device cpu (or auto), or install a CUDA build of torch on a machine with an NVIDIA GPU"
        )
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(f"--device {asked}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}; "
                          "pick one of those (inside a Slurm task, its own GPU is cuda:0)")
    return torch.device("cuda", index)


def host_total_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def host_available_bytes() -> int:
    """RAM a new allocation can take without swapping (MemAvailable), or the total where unknown."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return host_total_bytes()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
