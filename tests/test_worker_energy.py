"""A round's energy on the worker's device (worker/energy.py): RAPL counters, the CPU estimate, NVML on a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from worker.device import plan_device
from worker.energy import (
    DEFAULT_GPU_WATTS, CpuTimeEstimate, EnergyMeter, RaplCounter, process_tree_cpu_seconds, wrapped_difference,
)

MAX_RANGE_UJ = 262_143_328_850  # what an Intel package domain reports


def rapl_domain(root: Path, name: str, label: str, energy_uj: int) -> Path:
    domain = root / name
    domain.mkdir()
    (domain / "name").write_text(label + "\n")
    (domain / "max_energy_range_uj").write_text(f"{MAX_RANGE_UJ}\n")
    (domain / "energy_uj").write_text(f"{energy_uj}\n")
    return domain


def set_uj(domain: Path, energy_uj: int) -> None:
    (domain / "energy_uj").write_text(f"{energy_uj}\n")


def test_rapl_sums_the_package_counters_across_wraps_and_ignores_their_subdomains(tmp_path: Path) -> None:
    package0 = rapl_domain(tmp_path, "intel-rapl:0", "package-0", MAX_RANGE_UJ - 2_000_000)
    package1 = rapl_domain(tmp_path, "intel-rapl:1", "package-1", 10_000_000)
    core = rapl_domain(tmp_path, "intel-rapl:0:0", "core", 5)  # inside package-0: counted there already
    psys = rapl_domain(tmp_path, "intel-rapl:2", "psys", 5)  # the whole platform: holds the packages
    counter = RaplCounter.find(tmp_path, poll_seconds=0)
    assert counter is not None
    meter = EnergyMeter(counter)
    mark = meter.start()
    set_uj(package0, 3_000_000)  # wrapped: 2 J up to the top, then 3 J
    set_uj(package1, 17_000_000)
    set_uj(core, 99_000_000)
    set_uj(psys, 99_000_000)
    energy = meter.since(mark, busy_seconds=0.0)
    assert (energy.method, energy.joules) == ("rapl", pytest.approx(12.0))

    # Read in between (as the poll thread does every 30 s), two wraps in one round are both counted.
    mark = meter.start()
    set_uj(package0, MAX_RANGE_UJ - 1_000_000)
    counter.joules()
    set_uj(package0, 1_000_000)
    counter.joules()
    set_uj(package0, 4_000_000)
    assert meter.since(mark, 0.0).joules == pytest.approx((MAX_RANGE_UJ - 4_000_000) / 1e6 + 1 + 1 + 3)
    assert wrapped_difference(10, 4, 20) == 14 and wrapped_difference(4, 10, 20) == 6


def test_the_worker_falls_back_to_an_estimate_where_rapl_cannot_be_read(tmp_path: Path) -> None:
    plan = plan_device("cpu")
    estimate = EnergyMeter.for_device(plan, rated_watts=16.0 * os.cpu_count(), powercap=tmp_path / "absent")
    assert estimate.method == "estimate" and estimate.counter.watts_per_cpu == 16.0  # the package's rating, per CPU
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    domain = rapl_domain(unreadable, "intel-rapl:0", "package-0", 1)
    (domain / "energy_uj").unlink()
    (domain / "energy_uj").mkdir()  # reading it fails, as a root-only file does for other users
    assert RaplCounter.find(unreadable) is None
    assert EnergyMeter.for_device(plan, powercap=unreadable).method == "estimate"
    readable = tmp_path / "readable"
    readable.mkdir()
    rapl_domain(readable, "intel-rapl:0", "package-0", 1)
    meter = EnergyMeter.for_device(plan, powercap=readable)
    assert meter.method == "rapl"
    meter.close()  # its poll thread stops
    with pytest.raises(ValueError, match="--rated-watts nan: give the device's rated power in watts"):
        EnergyMeter.for_device(plan, rated_watts=float("nan"))


# A stand-in for a worker: once told, it spins, then has a child of its own spin; it reports their CPU seconds.
WORKER = """
import subprocess, sys, time
SPIN = "import time\\ns = time.process_time()\\nwhile time.process_time() - s < 0.25: pass\\nprint(time.process_time())"
print("ready", flush=True)
sys.stdin.readline()
started = time.process_time()
exec(SPIN.replace("print(time.process_time())", ""))
own = time.process_time() - started
child = float(subprocess.run([sys.executable, "-c", SPIN], capture_output=True, text=True, check=True).stdout)
print(own, child, flush=True)
sys.stdin.readline()
"""


def test_the_cpu_estimate_counts_the_cpu_seconds_of_a_process_and_its_children() -> None:
    worker = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline().strip() == "ready"
        meter = EnergyMeter(CpuTimeEstimate(watts_per_cpu=8.0, root_pid=worker.pid))
        mark = meter.start()
        time.sleep(0.2)  # idle, waiting to be told: next to nothing
        assert meter.since(mark, busy_seconds=0.0).joules <= 8.0 * 0.02

        mark = meter.start()
        worker.stdin.write("go\n")
        worker.stdin.flush()
        used = sum(map(float, worker.stdout.readline().split()))  # its own CPU seconds and its child's
        energy = meter.since(mark, busy_seconds=123.0)  # busy seconds are a GPU's: not used on the CPU
        assert energy.method == "estimate"
        assert 8.0 * (used - 0.05) <= energy.joules <= 8.0 * (used + 0.15), (energy.joules, used)
    finally:
        worker.kill()
        worker.wait()


def test_the_process_tree_counts_a_running_childs_cpu_time() -> None:
    before = process_tree_cpu_seconds(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time\ns = time.process_time()\n"
                              "while time.process_time() - s < 0.3: pass\ntime.sleep(30)"])
    try:
        deadline = time.monotonic() + 10
        while process_tree_cpu_seconds(os.getpid()) - before < 0.3:  # the child, alive: not waited for yet
            assert time.monotonic() < deadline, "the child's CPU time never showed"
            time.sleep(0.05)
    finally:
        child.kill()
        child.wait()


def test_a_gpu_without_nvml_is_estimated_from_its_rated_power_over_its_busy_seconds() -> None:
    meter = EnergyMeter(None, gpu_watts=DEFAULT_GPU_WATTS)
    mark = meter.start()
    assert (meter.since(mark, busy_seconds=2.0).joules, meter.method) == (2.0 * DEFAULT_GPU_WATTS, "estimate")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="NVML's energy counter needs an NVIDIA GPU")
def test_nvml_measures_real_gpu_work() -> None:
    plan = plan_device("cuda")
    meter = EnergyMeter.for_device(plan)
    assert meter.method == "nvml"
    mark = meter.start()
    started = time.monotonic()
    a = torch.randn(8192, 8192, device=plan.device)
    while time.monotonic() - started < 2.0:
        a = (a @ a).clamp_(-1, 1)
    torch.cuda.synchronize()
    energy = meter.since(mark, busy_seconds=0.0)
    watts = energy.joules / (time.monotonic() - started)
    assert energy.method == "nvml" and 20 < watts < 2000, watts
