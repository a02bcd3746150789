"""What a round costs the worker's device in energy, and how that figure was obtained.

Three ways, best first, chosen once per worker from its DevicePlan (worker/device.py):
- "nvml": on CUDA, the GPU's own energy counter (NVML's total energy since the driver
  loaded, in millijoules; Volta and newer). Needs `nvidia-ml-py` (the `pynvml` module).
- "rapl": on the CPU, the host's RAPL package counters (/sys/class/powercap/intel-rapl:N,
  AMD's too on recent kernels). They measure the whole package: on a shared host they
  count the other processes' work as well. Since Linux 5.10 only root may read them.
- "estimate": neither can be read. On the CPU, the CPU seconds this worker and its
  children (the hivemind DHT, averager and p2pd) used over the round times a power per
  busy CPU; on a GPU without NVML, its rated power over the seconds its inner steps ran
  (what it draws idle while averaging is not counted).
`--rated-watts` is the device's rated power (the whole CPU package on --device cpu, the
GPU's board power on CUDA): it sets the estimate when no counter can be read.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from protocol.choices import ENERGY_ESTIMATE, ENERGY_NVML, ENERGY_RAPL
from worker.device import DevicePlan

log = logging.getLogger("essaim.worker")

POWERCAP = Path("/sys/class/powercap")
# A busy hardware thread's share of its package's power. Green Algorithms (Lannelongue et al., 2021)
# tabulates CPUs' TDP per core at roughly 4 to 15 W; a core runs two hardware threads (what
# os.cpu_count() and CPU seconds count), so about 5 W each. Declare --rated-watts for a better figure.
DEFAULT_WATTS_PER_CPU = 5.0
# A data-centre GPU's board power when NVML cannot be read: A100 PCIe 250 W, L40S 350 W, H100 PCIe
# 350 W (SXM parts: 400 to 700 W). Declare --rated-watts for yours.
DEFAULT_GPU_WATTS = 300.0
RAPL_POLL_SECONDS = 30.0  # a package counter wraps after ~262 kJ: 9 minutes at 500 W, so read it well before
_RAPL_PACKAGE = re.compile(r"^intel-rapl:\d+$")  # package domains; intel-rapl:N:M are their cores, uncore, DRAM


@dataclass(frozen=True)
class Energy:
    joules: float
    method: str  # ENERGY_NVML | ENERGY_RAPL | ENERGY_ESTIMATE


class Counter(Protocol):
    method: str

    def joules(self) -> float:
        """Energy since the counter was made: only differences between two readings mean anything."""


class EnergyMeter:
    """Reads a round's energy: `mark = meter.start()` as the round begins, `meter.since(mark, busy)` when it ends."""

    def __init__(self, counter: Counter | None, gpu_watts: float = 0.0) -> None:
        self.counter = counter
        self._gpu_watts = gpu_watts  # no counter: the GPU's rated power over its busy seconds
        self.method = counter.method if counter is not None else ENERGY_ESTIMATE

    @classmethod
    def for_device(cls, plan: DevicePlan, rated_watts: float = 0.0, powercap: Path = POWERCAP) -> "EnergyMeter":
        if not (math.isfinite(rated_watts) and rated_watts >= 0):
            raise ValueError(f"--rated-watts {rated_watts}: give the device's rated power in watts, a finite number "
                             "(0: a typical figure)")
        if plan.is_cuda:
            counter = nvml_counter(plan)
            if counter is not None:
                return cls(counter)
            watts = rated_watts or DEFAULT_GPU_WATTS
            log.info("energy: estimated as %.0f W (%s) over the inner steps' seconds", watts,
                     "--rated-watts" if rated_watts else "a typical GPU's; declare --rated-watts")
            return cls(None, gpu_watts=watts)
        rapl = RaplCounter.find(powercap)
        if rapl is not None:
            return cls(rapl)
        per_cpu = rated_watts / (os.cpu_count() or 1) if rated_watts else DEFAULT_WATTS_PER_CPU
        log.info("energy: no readable RAPL counter; estimated as %.1f W per busy CPU (%s) over this worker's CPU "
                 "seconds", per_cpu, "--rated-watts over the host's CPUs" if rated_watts
                 else "a typical CPU's; declare --rated-watts for the package")
        return cls(CpuTimeEstimate(per_cpu))

    def start(self) -> float:
        return self.counter.joules() if self.counter is not None else 0.0

    def since(self, mark: float, busy_seconds: float) -> Energy:
        """Energy from `mark` to now; `busy_seconds`: the device's compute time, for a GPU without a counter."""
        if self.counter is None:
            return Energy(self._gpu_watts * max(busy_seconds, 0.0), ENERGY_ESTIMATE)
        return Energy(max(self.counter.joules() - mark, 0.0), self.counter.method)

    def close(self) -> None:
        close = getattr(self.counter, "close", None)
        if close is not None:
            close()


# -- the CPU estimate -------------------------------------------------------------------------


class CpuTimeEstimate:
    """CPU seconds of this process and its descendants, times a power per busy CPU."""

    method = ENERGY_ESTIMATE

    def __init__(self, watts_per_cpu: float, root_pid: int | None = None) -> None:
        self.watts_per_cpu = watts_per_cpu
        self._root = root_pid or os.getpid()

    def joules(self) -> float:
        return process_tree_cpu_seconds(self._root) * self.watts_per_cpu


def process_tree_cpu_seconds(root_pid: int) -> float:
    """User and system CPU seconds of a process and its descendants, living or waited for, from /proc.

    Each process's figure holds the children it waited for (cutime, cstime): a child that exits
    between two readings still counts, once. Where there is no /proc (macOS): the process's own
    time and its waited-for children's (os.times).
    """
    try:
        entries = os.listdir("/proc")
    except OSError:
        times = os.times()
        return times.user + times.system + times.children_user + times.children_system
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()  # after "pid (comm)": comm may hold spaces
        except (OSError, IndexError):
            continue  # exited while listed
        parents[int(entry)] = int(fields[1])
        ticks[int(entry)] = sum(int(value) for value in fields[11:15])  # utime, stime, cutime, cstime
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    total, pending, seen = 0, [root_pid], set()
    while pending:
        pid = pending.pop()
        if pid in ticks and pid not in seen:
            seen.add(pid)
            total += ticks[pid]
            pending.extend(children.get(pid, ()))
    return total / os.sysconf("SC_CLK_TCK")


# -- RAPL -------------------------------------------------------------------------------------


@dataclass
class RaplDomain:
    path: Path
    max_range_uj: int  # the counter wraps to 0 past this
    last_uj: int


class RaplCounter:
    """The host's RAPL package counters, summed, each wrap-around accounted for.

    A reading is taken at least every RAPL_POLL_SECONDS (a daemon thread), so that a long round
    cannot hide a whole wrap between its two readings.
    """

    method = ENERGY_RAPL

    def __init__(self, domains: list[RaplDomain], poll_seconds: float = RAPL_POLL_SECONDS) -> None:
        self._domains = domains
        self._lock = threading.Lock()
        self._total_uj = 0
        self._stop = threading.Event()
        if poll_seconds > 0:
            threading.Thread(target=self._poll, args=(poll_seconds,), name="rapl-poll", daemon=True).start()

    @classmethod
    def find(cls, powercap: Path = POWERCAP, poll_seconds: float = RAPL_POLL_SECONDS) -> "RaplCounter | None":
        """The package domains under `powercap`, if every one reads; None (and why, in the log) otherwise."""
        domains = []
        try:
            candidates = sorted(p for p in powercap.iterdir() if _RAPL_PACKAGE.match(p.name))
        except OSError:
            return None
        for path in candidates:
            try:
                if not (path / "name").read_text(encoding="ascii").strip().startswith("package"):
                    continue  # psys: the whole platform, which holds the packages
                domains.append(RaplDomain(path, int((path / "max_energy_range_uj").read_text(encoding="ascii")),
                                          _read_uj(path)))
            except (OSError, ValueError) as error:
                log.info("energy: RAPL counter %s cannot be read (%s; only root may, since Linux 5.10): estimating",
                         path, error)
                return None
        return cls(domains, poll_seconds) if domains else None

    def joules(self) -> float:
        with self._lock:
            for domain in self._domains:
                try:
                    now = _read_uj(domain.path)
                except (OSError, ValueError) as error:  # it read at start: a passing failure, caught up next time
                    log.debug("energy: RAPL %s: %s", domain.path, error)
                    continue
                self._total_uj += wrapped_difference(domain.last_uj, now, domain.max_range_uj)
                domain.last_uj = now
            return self._total_uj / 1e6

    def close(self) -> None:
        self._stop.set()

    def _poll(self, seconds: float) -> None:
        while not self._stop.wait(seconds):
            self.joules()


def wrapped_difference(before: int, after: int, max_range: int) -> int:
    """How far a counter that wraps to 0 past `max_range` went from `before` to `after` (at most one wrap)."""
    return after - before if after >= before else max_range - before + after


def _read_uj(path: Path) -> int:
    return int((path / "energy_uj").read_text(encoding="ascii"))


# -- NVML -------------------------------------------------------------------------------------


class NvmlCounter:
    """A GPU's total-energy counter (millijoules since the driver loaded: 64 bits, no wrap to handle)."""

    method = ENERGY_NVML

    def __init__(self, nvml, handle) -> None:  # type: ignore[no-untyped-def]  # the pynvml module, a device handle
        self._nvml = nvml
        self._handle = handle
        self._first_mj = nvml.nvmlDeviceGetTotalEnergyConsumption(handle)

    def joules(self) -> float:
        return (self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) - self._first_mj) / 1000.0


def nvml_counter(plan: DevicePlan) -> NvmlCounter | None:
    """The plan's GPU's NVML counter, or None (and why, once in the log) when NVML cannot give one."""
    try:
        import pynvml  # nvidia-ml-py: imported only on CUDA
    except ImportError:
        log.warning("energy: the nvidia-ml-py package is not installed, so the GPU's energy counter cannot be read: "
                    "rounds report an estimate (pip install nvidia-ml-py to measure)")
        return None
    import torch

    try:
        pynvml.nvmlInit()
        # By UUID: CUDA's device numbers follow CUDA_VISIBLE_DEVICES (a Slurm task's GPU is cuda:0), NVML's do not.
        uuid = str(torch.cuda.get_device_properties(plan.device).uuid)
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
        return NvmlCounter(pynvml, handle)
    except (pynvml.NVMLError, AttributeError, RuntimeError) as error:  # no driver access, a GPU older than Volta
        log.warning("energy: NVML gives no energy counter for %s (%s): rounds report an estimate", plan.describe(),
                    error)
        return None
