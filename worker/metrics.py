"""A worker's own Prometheus metrics, on `essaim worker join --metrics-port`.

One worker process is one scrape target, so no metric carries a worker label (Prometheus
adds `instance`). The figures are updated once per round, from what the round measured
anyway: nothing is added to the inner steps. The names are the ones examples/grafana's
dashboard reads.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import sys
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from protocol.choices import ENERGY_METHODS
from worker.device import DevicePlan
from worker.energy import Energy

log = logging.getLogger("essaim.worker")

PHASES = ("inner", "average", "report")
OUTCOMES = ("kept", "dropped")
# A round's phases last from a fraction of a second (a tiny model's report) to an hour (a 7B model's inner steps).
PHASE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, float("inf"))


class MetricsPortInUse(ValueError):
    """--metrics-port names a port something else holds; the message says what to do."""


@dataclass(frozen=True)
class RoundFigures:
    """What one round measured, as the worker's metrics show it."""

    tokens: int
    tokens_per_second: float
    inner_loss: float
    inner_seconds: float
    average_seconds: float
    bytes_sent: int
    energy: Energy


class WorkerMetrics:
    def __init__(self, plan: DevicePlan | None = None, energy_method: str = "") -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self._plan = plan
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.tokens_per_second = Gauge("essaim_worker_tokens_per_second", "Tokens trained per second of inner "
                                       "steps in the last round", registry=registry)
        self.inner_loss = Gauge("essaim_worker_inner_loss", "Mean inner-step loss of the last round",
                                registry=registry)
        self.round = Gauge("essaim_worker_round", "The round this worker trains next", registry=registry)
        self.phase_seconds = Histogram("essaim_worker_round_phase_seconds", "Seconds of a round's phases: inner "
                                       "steps, averaging (the outer step), report", ["phase"], buckets=PHASE_BUCKETS,
                                       registry=registry)
        self.tokens_trained = Counter("essaim_worker_tokens_trained", "Tokens trained in inner steps",
                                      registry=registry)
        self.bytes_sent = Counter("essaim_worker_bytes_sent", "Bytes this worker sent while averaging",
                                  registry=registry)
        self.rounds = Counter("essaim_worker_rounds", "Rounds finished: kept in the swarm's model, or dropped",
                              ["outcome"], registry=registry)
        self.device_memory = Gauge("essaim_worker_device_memory_bytes", "Device memory: allocated and peak on "
                                   "CUDA, the process's resident set on the CPU", ["kind"], registry=registry)
        self.energy = Counter("essaim_worker_energy_joules", "Energy the rounds cost the device, by how it was "
                              "obtained (worker/energy.py)", ["method"], registry=registry)
        for phase in PHASES:  # every series exists from the first scrape, so rate() has a start
            self.phase_seconds.labels(phase)
        for outcome in OUTCOMES:
            self.rounds.labels(outcome)
        if energy_method:
            self.energy.labels(energy_method)
        self.update_memory()

    def serve(self, host: str, port: int) -> None:
        """Serve /metrics on host:port (in a daemon thread); MetricsPortInUse if the port is taken."""
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as error:
            if error.errno in (errno.EADDRINUSE, errno.EACCES):
                raise MetricsPortInUse(
                    f"--metrics-port {port}: {host}:{port} cannot be bound ({os.strerror(error.errno)}): pick a free "
                    "port, or 0 to serve no metrics") from None
            raise
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    @property
    def port(self) -> int:
        assert self._server is not None, "not serving"
        return self._server.server_port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def round_finished(self, figures: RoundFigures, kept: bool, next_round: int, report_seconds: float) -> None:
        self.tokens_per_second.set(figures.tokens_per_second)
        self.inner_loss.set(figures.inner_loss)
        self.round.set(next_round)
        self.phase_seconds.labels("inner").observe(figures.inner_seconds)
        self.phase_seconds.labels("average").observe(figures.average_seconds)
        if report_seconds > 0:  # a round the worker dropped before reporting has no report phase
            self.phase_seconds.labels("report").observe(report_seconds)
        self.tokens_trained.inc(figures.tokens)
        self.bytes_sent.inc(figures.bytes_sent)
        self.rounds.labels("kept" if kept else "dropped").inc()
        if figures.energy.method in ENERGY_METHODS:
            self.energy.labels(figures.energy.method).inc(figures.energy.joules)
        self.update_memory()

    def update_memory(self) -> None:
        plan = self._plan
        if plan is not None and plan.is_cuda:
            import torch

            self.device_memory.labels("allocated").set(torch.cuda.memory_allocated(plan.device))
            self.device_memory.labels("peak").set(torch.cuda.max_memory_allocated(plan.device))
        else:
            self.device_memory.labels("rss").set(resident_bytes())


def resident_bytes() -> int:
    """This process's resident set now (/proc), or its peak where there is no /proc (macOS)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere
