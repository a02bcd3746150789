"""The coordinator's /metrics and dashboard JSON over real RPCs: they follow rounds, tokens, leases and refusals."""

from __future__ import annotations

import json
import os
import re
import socket
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select, update

from coordinator import run_figures
from coordinator.config import AdmissionSettings, CoordinatorSettings, RunSettings
from coordinator.metrics import RpcMetrics, RunCollector
from coordinator.run_figures import FiguresCache
from coordinator.server import start
from coordinator.store import Evaluation, Lease, LineageRecord, Shard, open_engine, session_factory, sqlite_url
from coordinator.web_views import PortUnavailable, WebViews
from model.shards import Manifest
from protocol import essaim_pb2 as pb
from protocol.certificates import certify
from protocol.identity import Identity
from support import Clock, free_port, one_shard_store, wait_for
from http_views import read_summary, scrape
from worker.capabilities import Capabilities
from worker.client import CoordinatorClient, CoordinatorRefused

CPU = Capabilities("cpu", 0, "volunteer", 0.0, "", 0.0)
GPU = Capabilities("cuda:0 H100", 80 << 30, "hpc", 0.0, "", 0.0, "bf16")
GENCI = Ed25519PrivateKey.generate()
GRID_GRAMS_PER_KWH = 50.0
JOULES = 7200.0  # each of GENCI's rounds: 2 Wh
GRAFANA = Path(__file__).resolve().parents[1] / "examples" / "grafana" / "essaim.json"
# What a worker's --metrics-port serves, as agreed with its implementation (worker/metrics.py): name -> type.
WORKER_METRICS = {
    "essaim_worker_tokens_per_second": "gauge", "essaim_worker_inner_loss": "gauge", "essaim_worker_round": "gauge",
    "essaim_worker_round_phase_seconds": "histogram", "essaim_worker_tokens_trained": "counter",
    "essaim_worker_bytes_sent": "counter", "essaim_worker_rounds": "counter",
    "essaim_worker_device_memory_bytes": "gauge", "essaim_worker_energy_joules": "counter",
}
SERIES_SUFFIXES = {"gauge": ("",), "counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "info": ("_info",)}


def play_round(round_number: int, workers: list[CoordinatorClient]) -> int:
    """Each worker leases and reports the round (the last report decides it); the tokens trained."""
    leases = [worker.acquire_lease(300, round_number).lease for worker in workers]
    for worker, lease in zip(workers, leases):
        worker.complete_round(pb.CompleteRoundRequest(
            round=round_number, leases=[pb.LeaseUsage(lease_id=lease.lease_id, tokens_consumed=lease.end - lease.start)],
            loss=5.0 - round_number, pseudo_gradient_digest="d" * 64, params_digest=f"{round_number:064d}",
            group_size=len(workers), bytes_sent=1000, inner_seconds=1.0, wall_seconds=2.0,
            energy=pb.RoundEnergy(joules=JOULES, method="estimate") if worker is workers[0] else None,
        ), stop=lambda: True)
    return sum(lease.end - lease.start for lease in leases)


def settings(tmp_path: Path, corpus_dir: Path, **ports: int) -> CoordinatorSettings:
    return CoordinatorSettings(
        data_dir=corpus_dir, database_url=sqlite_url(tmp_path / "coordinator.db"), port=0,
        run=RunSettings(lease_seconds=30, target_group_size=2, heartbeat_seconds=5),
        admission=AdmissionSettings(institutions={"GENCI": certify("GENCI", GENCI, b"\0" * 32, "hpc", 0).institution_key}),
        **ports)


def test_metrics_and_the_dashboard_follow_rounds_tokens_leases_and_refusals(tmp_path: Path, corpus_dir: Path) -> None:
    coordinator = start(settings(tmp_path, corpus_dir, metrics_port=free_port(), dashboard_port=free_port()))
    try:
        check_views(coordinator, corpus_dir, session_factory(open_engine(sqlite_url(tmp_path / "coordinator.db"))))
    finally:
        coordinator.stop()


def check_views(coordinator, corpus_dir: Path, sessions) -> None:  # type: ignore[no-untyped-def]
    metrics, dashboard = coordinator.views.metrics_url, coordinator.views.dashboard_url
    before = scrape(metrics)
    assert before.value("essaim_coordinator_round") == 0 and before.value("essaim_coordinator_rounds_decided_total") == 0
    assert before.total("essaim_coordinator_tokens_trained_total") == 0

    hpc_identity = Identity.generate()
    hpc = CoordinatorClient(coordinator.address, hpc_identity)
    volunteer = CoordinatorClient(coordinator.address, Identity.generate())
    hpc.register("node-1", "GENCI", GPU, certify("GENCI", GENCI, hpc_identity.public_key, "hpc",
                                                  int(time.time()) + 3600).to_bytes(), grid_gco2_per_kwh=GRID_GRAMS_PER_KWH)
    volunteer.register("pc", "volunteer", CPU)
    hpc.heartbeat(0, 0.0, 2000.0)
    volunteer.heartbeat(0, 0.0, 500.0)
    trained = play_round(0, [hpc, volunteer]) + play_round(1, [hpc, volunteer])

    # Refusals, one per reason: an unknown worker, a NaN loss, a file the corpus does not hold (a stream).
    with pytest.raises(CoordinatorRefused):
        CoordinatorClient(coordinator.address, Identity.generate(), retry_seconds=0).heartbeat(0, 0.0, 0.0)
    with pytest.raises(CoordinatorRefused):
        volunteer.complete_round(pb.CompleteRoundRequest(round=2, loss=float("nan")))
    shard = Manifest.load(corpus_dir / "manifest.json").shards[0]
    assert sum(len(piece.data) for piece in volunteer.read_corpus_file(shard.file, 0, 100)) == 100
    with pytest.raises(grpc.RpcError) as missing:
        list(volunteer.read_corpus_file("no-such-shard.bin", 0, 100))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    # A lease not granted is a refusal too, counted by the reply's status: round 0 is over.
    assert volunteer.acquire_lease(300, 0).status == pb.AcquireLeaseReply.ROUND_OVER
    # A lease whose deadline passes is expired by the coordinator's own sweep, within a second.
    out = volunteer.acquire_lease(300, 2).lease
    with sessions.begin() as session:
        session.execute(update(Lease).where(Lease.id == out.lease_id).values(deadline=time.time() - 1))

    samples = wait_for(lambda: (s := scrape(metrics)).value("essaim_coordinator_leases_expired_total") == 1 and s,
                       15, "the expired lease in /metrics")
    assert samples.value("essaim_coordinator_round") == 2 and samples.value("essaim_coordinator_rounds_decided_total") == 2
    assert samples.value("essaim_coordinator_round_loss") == 4.0  # round 1's
    assert samples.value("essaim_coordinator_leases_out") == 0
    assert samples.value("essaim_coordinator_workers_live", trust_class="hpc") == 1
    assert samples.value("essaim_coordinator_workers_live", trust_class="volunteer") == 1
    assert samples.value("essaim_coordinator_workers_registered") == 2
    assert samples.value("essaim_coordinator_tokens_per_second") == 2500.0

    # Tokens by source, language, institution and class: the lineage's, in every split.
    name = "essaim_coordinator_tokens_trained_total"
    assert samples.total(name) == trained
    assert samples.labels(name, "institution") == {"GENCI", "independent"}
    assert samples.labels(name, "trust_class") == {"hpc", "volunteer"}
    assert samples.total(name, institution="GENCI") == samples.total(name, trust_class="hpc") > 0
    with sessions() as session:
        by_source = dict(session.execute(select(Shard.source, func.sum(LineageRecord.end - LineageRecord.start))
                                         .join(Shard, Shard.id == LineageRecord.shard_id).group_by(Shard.source)).all())
        languages = dict(session.execute(select(Shard.source, Shard.language).distinct()).all())
    assert {source: samples.total(name, source=source) for source in samples.labels(name, "source")} == by_source
    assert all(samples.total(name, source=source, language=languages[source]) == tokens
               for source, tokens in by_source.items())

    # Rounds' shape: wall time between rounds (one interval for two rounds), group sizes, bytes, energy.
    assert samples.value("essaim_coordinator_round_wall_seconds_count") == 1
    assert samples.value("essaim_coordinator_round_group_size_count") == 2
    assert samples.value("essaim_coordinator_round_group_size_sum") == 4
    assert samples.value("essaim_coordinator_round_group_size_bucket", le="1.0") == 0
    assert samples.value("essaim_coordinator_round_group_size_bucket", le="2.0") == 2
    assert samples.value("essaim_coordinator_bytes_averaged_total") == 4 * 1000
    assert samples.value("essaim_coordinator_energy_joules_total", institution="GENCI") == 2 * JOULES
    assert samples.value("essaim_coordinator_emissions_grams_total", institution="GENCI") == pytest.approx(
        2 * JOULES / 3.6e6 * GRID_GRAMS_PER_KWH)
    # The epoch's progress is read more rarely (its own test below): its size is the corpus's.
    assert samples.value("essaim_coordinator_epoch_tokens") == sum(s.tokens for s in Manifest.load(
        corpus_dir / "manifest.json").shards)

    # Every RPC timed; every refusal counted by its RPC and status code.
    count = "essaim_coordinator_rpc_duration_seconds_count"
    assert samples.value(count, rpc="Register") == 2 and samples.value(count, rpc="CompleteRound") == 5
    assert samples.value(count, rpc="AcquireLease") == 6 and samples.value(count, rpc="ReadCorpusFile") == 2
    refusals = "essaim_coordinator_rpc_refusals_total"
    assert samples.value(refusals, rpc="Heartbeat", code="UNAUTHENTICATED") == 1
    assert samples.value(refusals, rpc="CompleteRound", code="INVALID_ARGUMENT") == 1
    assert samples.value(refusals, rpc="ReadCorpusFile", code="NOT_FOUND") == 1
    assert samples.total(refusals) == 3
    assert samples.value("essaim_coordinator_lease_refusals_total", status="ROUND_OVER") == 1
    assert samples.total("essaim_coordinator_lease_refusals_total") == 1

    # The dashboard's JSON says the same, and adds the mixture's targets and held-out evaluations.
    with sessions.begin() as session:
        session.add(Evaluation(round=1, params_digest="1" * 64, group="language", name="fr", tokens=100, bytes=400,
                               loss=4.2, bits_per_byte=1.5, worker_id="", created_at=time.time()))
    summary = wait_for(lambda: (s := read_summary(dashboard)).get("evaluations") and s, 10, "the evaluation")
    assert (summary["round"], summary["rounds_decided"], summary["leases_expired"]) == (2, 2, 1)
    assert [r["loss"] for r in summary["loss"]] == [5.0, 4.0]
    assert [r["group_size"] for r in summary["recent_rounds"]] == [2, 2]
    assert sum(s["target_share"] for s in summary["sources"]) == pytest.approx(1.0)
    assert {s["name"]: s["tokens"] for s in summary["sources"] if s["tokens"]} == by_source
    institutions = {i["name"]: i for i in summary["institutions"]}
    assert institutions["GENCI"]["unverified"] + institutions["independent"]["unverified"] == trained
    assert institutions["GENCI"]["energy_kwh"] == pytest.approx(2 * JOULES / 3.6e6)
    assert summary["workers"]["by_trust_class"] == [{"name": "hpc", "workers": 1, "tokens_per_second": 2000.0},
                                                    {"name": "volunteer", "workers": 1, "tokens_per_second": 500.0}]
    assert {d["name"] for d in summary["workers"]["by_device"]} == {"cpu", "cuda:0 H100"}
    assert summary["evaluations"] == [{"round": 1, "group": "language", "name": "fr", "loss": 4.2, "bits_per_byte": 1.5}]
    page = urllib.request.urlopen(dashboard, timeout=10)
    assert "connect-src 'self'" in page.headers["Content-Security-Policy"]
    html = page.read().decode()
    assert "api/summary" in html and "http://" not in html.replace("http://www.w3.org/2000/svg", "")


def test_a_busy_dashboard_port_stops_the_coordinator_with_the_option_to_change(tmp_path: Path,
                                                                               corpus_dir: Path) -> None:
    grpc_port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        before = descendants()
        with pytest.raises(PortUnavailable, match=f"the dashboard port {busy} on 127.0.0.1 is in use.*--dashboard-port"):
            start(settings(tmp_path, corpus_dir, dashboard_port=busy).model_copy(update={"port": grpc_port}))
    # Nothing of it is left: the gRPC port is free again, and the DHT peer it had started is gone.
    with socket.socket() as again:
        again.bind(("127.0.0.1", grpc_port))
    wait_for(lambda: descendants() <= before, 10, "the DHT peer to stop")


def descendants() -> set[int]:
    """This process's live descendants (the DHT peer's process and its p2pd), torch's own helper excepted:
    torch_shm_manager, started for shared tensors on first use, serves the process until it exits."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        state, parent = stat[stat.rindex(")") + 2:].split()[:2]
        if entry.name.isdigit() and state != "Z" and not name.startswith("torch_shm"):  # (comm: 15 characters)
            parents[int(entry.name)] = int(parent)
    found, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def test_a_view_that_cannot_bind_leaves_the_other_one_stopped(tmp_path: Path) -> None:
    sessions = one_shard_store(sqlite_url(tmp_path / "coordinator.db"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy, free = taken.getsockname()[1], free_port()
        for metrics_port, dashboard_port, option in ((free, busy, "--dashboard-port"), (busy, free, "--metrics-port")):
            views = WebViews(CoordinatorSettings(data_dir=tmp_path, database_url="sqlite://",
                                                 metrics_port=metrics_port, dashboard_port=dashboard_port))
            with pytest.raises(PortUnavailable, match=f"port {busy} on 127.0.0.1 is in use.*choose a free one with {option}"):
                views.start(sessions, "run", None)
            with socket.socket() as again:  # the view that did start is closed: its port is free again
                again.bind(("127.0.0.1", free))
    with pytest.raises(ValueError, match="both .* give each its own port"):
        CoordinatorSettings(data_dir=tmp_path, database_url="sqlite://", metrics_port=free, dashboard_port=free)


def test_viewers_share_one_reading_a_slow_one_is_kept_longer_and_the_epoch_longer_still(tmp_path: Path,
                                                                                         monkeypatch) -> None:
    clock = Clock(1000.0)
    figures = FiguresCache(one_shard_store(sqlite_url(tmp_path / "coordinator.db")), "run", 10,
                           live_within_seconds=15, clock=clock)
    first = figures.current()
    assert figures.current() is first and figures.readings == 1
    clock.now += 1.0
    assert figures.current() is not first and (figures.readings, figures.epoch_readings) == (2, 2)

    # A database grown large: the figures take 0.1 s to read (kept 2 s), the epoch's scan 0.5 s (kept 100 s).
    scan, read = run_figures.oldest_open_epoch, FiguresCache._read
    monkeypatch.setattr(run_figures, "oldest_open_epoch", lambda session: (setattr(clock, "now", clock.now + 0.5),
                                                                           scan(session))[1])
    monkeypatch.setattr(FiguresCache, "_read", lambda self, *args: (setattr(clock, "now", clock.now + 0.1),
                                                                   read(self, *args))[1])
    clock.now += 1.0
    started = clock.now
    figures.current()
    assert (figures.readings, figures.epoch_readings) == (3, 3)
    clock.now = started + 1.9
    figures.current()
    assert figures.readings == 3
    clock.now = started + 2.01
    figures.current()
    assert (figures.readings, figures.epoch_readings) == (4, 3)
    clock.now = started + 100.01
    figures.current()
    assert (figures.readings, figures.epoch_readings) == (5, 4)


def coordinator_metrics(tmp_path: Path) -> dict[str, str]:
    """Every metric family the coordinator's registry serves (name -> type), read from a fresh run's store."""
    registry = CollectorRegistry()
    RpcMetrics(registry)
    registry.register(RunCollector(FiguresCache(one_shard_store(sqlite_url(tmp_path / "coordinator.db")), "run", 10,
                                                live_within_seconds=15)))
    return {family.name: family.type for family in text_string_to_metric_families(generate_latest(registry).decode())}


def test_the_grafana_dashboard_charts_every_metric_and_queries_none_that_does_not_exist(tmp_path: Path) -> None:
    dashboard = json.loads(GRAFANA.read_text())
    assert dashboard["schemaVersion"] >= 39 and [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    targets = [t for p in panels for t in p["targets"]]
    assert all(p["datasource"]["uid"] == "${DS_PROMETHEUS}" for p in panels + targets + dashboard["templating"]["list"])
    queried = {name for query in [t["expr"] for t in targets] + [v["definition"] for v in dashboard["templating"]["list"]]
               for name in re.findall(r"\bessaim_[a-z0-9_]+", query)}

    families = {**coordinator_metrics(tmp_path), **WORKER_METRICS}
    assert len([f for f in families if f.startswith("essaim_coordinator_")]) >= 20
    series = {family: {family + suffix for suffix in SERIES_SUFFIXES[kind]} for family, kind in families.items()}
    assert queried - set().union(*series.values()) == set()  # no panel waits for a metric nobody serves
    assert [family for family, names in series.items() if not names & queried] == []  # and every metric is charted
