"""A worker's own Prometheus metrics (worker/metrics.py), served over HTTP and read back with prometheus_client's parser."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from worker.device import plan_device
from worker.energy import Energy
from worker.metrics import MetricsPortInUse, RoundFigures, WorkerMetrics, resident_bytes

# The names examples/grafana's dashboard reads, as exposed (counters with _total, the histogram's _count).
NAMES = {
    "essaim_worker_tokens_per_second", "essaim_worker_inner_loss", "essaim_worker_round",
    "essaim_worker_round_phase_seconds_count", "essaim_worker_tokens_trained_total", "essaim_worker_bytes_sent_total",
    "essaim_worker_rounds_total", "essaim_worker_device_memory_bytes", "essaim_worker_energy_joules_total",
}


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample served on /metrics: (name, labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_a_worker_serves_its_rounds_figures_once_per_round() -> None:
    metrics = WorkerMetrics(plan_device("cpu"), "estimate")
    metrics.serve("127.0.0.1", 0)
    port = metrics.port
    try:
        before = scrape(port)
        assert {name for name, _ in before} >= NAMES
        assert before[("essaim_worker_rounds_total", (("outcome", "kept"),))] == 0  # every series from the start
        assert before[("essaim_worker_energy_joules_total", (("method", "estimate"),))] == 0

        kept = RoundFigures(tokens=2048, tokens_per_second=512.0, inner_loss=3.25, inner_seconds=4.0,
                            average_seconds=0.75, bytes_sent=1_000_000, energy=Energy(120.0, "estimate"))
        dropped = RoundFigures(tokens=1024, tokens_per_second=256.0, inner_loss=3.5, inner_seconds=4.0,
                               average_seconds=40.0, bytes_sent=0, energy=Energy(80.0, "estimate"))
        metrics.round_finished(kept, kept=True, next_round=1, report_seconds=0.2)
        metrics.round_finished(dropped, kept=False, next_round=2, report_seconds=0.0)  # dropped before reporting
        after = scrape(port)
    finally:
        metrics.close()

    def value(name: str, **labels: str) -> float:
        return after[(name, tuple(sorted(labels.items())))]

    assert (value("essaim_worker_tokens_per_second"), value("essaim_worker_inner_loss")) == (256.0, 3.5)  # the last
    assert value("essaim_worker_round") == 2
    assert value("essaim_worker_tokens_trained_total") == 3072 and value("essaim_worker_bytes_sent_total") == 1e6
    assert (value("essaim_worker_rounds_total", outcome="kept"), value("essaim_worker_rounds_total", outcome="dropped")) \
        == (1, 1)
    assert value("essaim_worker_energy_joules_total", method="estimate") == 200.0
    assert value("essaim_worker_round_phase_seconds_count", phase="inner") == 2
    assert value("essaim_worker_round_phase_seconds_sum", phase="average") == 40.75
    assert value("essaim_worker_round_phase_seconds_bucket", phase="average", le="1.0") == 1
    assert value("essaim_worker_round_phase_seconds_count", phase="report") == 1
    rss = value("essaim_worker_device_memory_bytes", kind="rss")  # a CPU worker: its resident set
    assert 0.5 * resident_bytes() < rss < 2 * resident_bytes()
    # One process is one target: no label names a worker.
    assert {label for _, labels in after for label, _ in labels} <= {"phase", "outcome", "kind", "method", "le"}
    with pytest.raises(OSError):
        scrape(port)  # closed: nothing listens any more


def test_a_metrics_port_in_use_is_refused_at_start_naming_the_flag() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsPortInUse, match=f"--metrics-port {port}: 127.0.0.1:{port} cannot be bound "
                                                   r"\(Address already in use\): pick a free port, or 0"):
            WorkerMetrics(plan_device("cpu")).serve("127.0.0.1", port)
