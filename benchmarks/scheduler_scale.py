"""The coordinator under a 10,000-worker network: lease grants and heartbeats per second, latency, CPU.

Usage: python benchmarks/scheduler_scale.py [--workers 1000,10000,30000 --ranges 1000000 --seconds 20
                                             --backends sqlite,postgresql --processes 1,2] [--views]

A real coordinator (`essaim coordinator serve`, gRPC, signed requests) on a corpus of
--ranges shard ranges, with --workers simulated workers (registered in its database
beforehand; their requests are signed with their own Ed25519 keys). Two phases per
database backend:
- target: the load of such a network, open loop: a heartbeat every 10 s and a lease a
  minute from each worker (each lease is then reported: AcquireLease + CompleteRound);
- saturation: as many requests as 48 client threads can push, same mix.
Each configuration (backend x workers x coordinator processes; SQLite serves with one) starts
from a freshly seeded database. With --processes 2 the coordinator serves its port from two
processes (`coordinator serve --processes 2`, PostgreSQL only).
Prints achieved rates, p50/p99 latency per call, and the coordinator's CPU (cores:
all its serving processes' CPU time / wall time, and per request served; for PostgreSQL,
the database server's CPU too), and the load generator's. In the
target phase latency counts from each request's scheduled send, so a generator that
falls behind shows as latency, not as a gentler load, and served_fraction is the share
of scheduled heartbeats and lease requests answered within the window. The JSON line
at the end holds every phase, and at its top the last target phase's served_fraction,
coordinator_cores and p99_ms (the worst request kind).
Goal: the target load costs under half a core with p99 under 50 ms. Run it on an
otherwise idle machine; the load generators share the cores with the coordinator.

With --views (SQLite), instead: what /metrics and the dashboard cost. The target load runs
against two coordinators at once, side by side, each on its own copy of one seeded database
(--repeats times): one without the views, one with --metrics-port and --dashboard-port while
Prometheus' part is played by a scrape of /metrics every --scrape-seconds and the page's by
--viewers browsers polling /api/summary every --poll-seconds. The scraper and viewers run
in this process, so their own CPU is not the coordinator's; each starts with one request
before the measured window (the first readings, the epoch's token-range scan included, are a
start-up cost: in steady state that scan recurs at most every 200x its duration).
Goal: the views add at most 5 % to the coordinator's CPU.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import multiprocessing as mp
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the PostgreSQL fixture's server, reused

import grpc  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from sqlalchemy import delete, insert  # noqa: E402

from coordinator.store import Source, TokenRange, Worker, load_manifest, open_engine, session_factory, sqlite_url  # noqa: E402
from essaim.processes import free_port, start_role, stop_group, wait_for_ready_file  # noqa: E402
from model.shards import Manifest, ShardInfo, SourceInfo  # noqa: E402
from model.tokenizer import train_tokenizer, tokenizer_sha256  # noqa: E402
from protocol import essaim_pb2 as pb  # noqa: E402
from protocol import essaim_pb2_grpc  # noqa: E402
from protocol.auth import sign_request  # noqa: E402
from protocol.identity import Identity  # noqa: E402
from protocol.limits import GRPC_OPTIONS  # noqa: E402

RANGE_TOKENS = 64
SHARDS = 10_000
CLIENT_PROCESSES = 2
MAX_LATE_SECONDS = 5.0  # open loop: a slot the generator reaches this late is dropped, counted as not served


def identity(index: int) -> Identity:
    seed = hashlib.sha256(f"essaim-scale-bench-{index}".encode()).digest()
    return Identity(Ed25519PrivateKey.from_private_bytes(seed))


def prepare_corpus(data: Path, ranges: int) -> Manifest:
    """A manifest of SHARDS shards (no shard files: the coordinator never reads them) and a tokenizer."""
    train_tokenizer(["Essaim: un réseau pour entraîner des modèles ouverts."] * 10, 300, data / "tokenizer")
    per_shard = max(1, ranges // SHARDS)
    sources = [SourceInfo(f"source-{i}", "fr", "CC0-1.0", float(i + 1), "2020-01-01", "2024-12-31") for i in range(4)]
    shards = [
        ShardInfo(f"shard-{i:05d}", f"shard-{i:05d}.bin", "0" * 64, per_shard * RANGE_TOKENS, "uint16", "fr",
                  f"source-{i % 4}", "CC0-1.0", f"{2020 + i % 5}-01-01", f"{2020 + i % 5}-12-31")
        for i in range(SHARDS)
    ]
    manifest = Manifest(300, tokenizer_sha256(data / "tokenizer"), sources, shards)
    manifest.save(data / "manifest.json")
    return manifest


def seed_database(url: str, manifest: Manifest, workers: int) -> None:
    """The corpus cut into RANGE_TOKENS-token pool ranges, and the workers, written straight into the store."""
    sessions = session_factory(open_engine(url))
    load_manifest(sessions, manifest)
    by_id = {s.shard_id: s for s in manifest.shards}
    with sessions.begin() as session:
        session.execute(delete(TokenRange))
    rows = [
        {"shard_id": s.shard_id, "epoch": 0, "start": start, "end": start + RANGE_TOKENS, "state": "pool",
         "source": s.source, "shard_date": s.date_from}
        for s in by_id.values() for start in range(0, s.tokens, RANGE_TOKENS)
    ]
    for chunk in range(0, len(rows), 50_000):
        with sessions.begin() as session:
            session.execute(insert(TokenRange), rows[chunk : chunk + 50_000])
    now = time.time()
    with sessions.begin() as session:
        session.execute(insert(Worker), [
            {"id": identity(i).worker_id, "public_key": identity(i).public_key, "name": f"sim-{i}",
             "institution": ("GENCI", "Inria", "volunteer")[i % 3], "device": "cpu", "registered_at": now,
             "last_seen": now, "trust_class": ("hpc", "institution", "volunteer")[i % 3]}
            for i in range(workers)
        ])
        assert session.query(Source).count() == 4


# -- load generation (in client processes) ---------------------------------------------------------


def client(address: str, workers: int, mode: str, rate: float, seconds: float, process: int, out: mp.Queue) -> None:
    """Send the mix for ``seconds``: open loop at ``rate`` requests/s (mode target) or closed loop (saturation)."""
    identities = [identity(i) for i in range(process, workers, CLIENT_PROCESSES)]
    channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
    stub = essaim_pb2_grpc.CoordinatorStub(channel)
    latencies: dict[str, list[float]] = {"Heartbeat": [], "AcquireLease": [], "CompleteRound": []}
    errors: list[str] = []
    offered: list[int] = []  # open-loop slots scheduled within the window
    served: list[str] = []   # requests answered within the window
    lease_answers: collections.Counter[str] = collections.Counter()  # AcquireLease replies by status
    counter = iter(range(10**9))
    lock = threading.Lock()
    # The open round, as the heartbeats' replies tell it: simulated workers follow the run as real ones do
    # (a lease asked for, or a report filed for, a decided round is refused, and the load would thin out).
    open_round = [0]
    started = time.perf_counter()
    # Open loop: enough threads that waiting for replies never holds a scheduled request back (10,000 workers
    # do not wait for each other); the closed loop keeps 48 requests in flight.
    threads = 48 if mode == "saturation" else 256

    def call(method: str, request, scheduled: float | None = None):  # type: ignore[no-untyped-def]
        """The reply, or None on an error. Latency counts from `scheduled` when given: in the open loop a
        request sent late because the generator fell behind is late for the worker all the same."""
        begin = time.perf_counter()
        try:
            reply = getattr(stub, method)(request, timeout=30)
        except grpc.RpcError as error:
            errors.append(f"{method}: {error.code().name} {error.details()}")
            return None
        done = time.perf_counter()
        latencies[method].append(done - (begin if scheduled is None else scheduled))
        if done <= started + seconds:
            served.append(method)
        return reply

    def loop() -> None:
        while True:
            with lock:
                n = next(counter)
            due = None
            if mode == "target":
                due = started + n / rate
                if due > started + seconds:
                    return
                offered.append(n)
                late = time.perf_counter() - due
                if late > MAX_LATE_SECONDS:
                    continue  # the generator is this far behind: the request counts as not served
                time.sleep(max(0.0, -late))
            elif time.perf_counter() - started > seconds:
                return
            worker = identities[n % len(identities)]
            if n % 7 != 6:  # 6 heartbeats for each lease cycle: 10 s heartbeats, 60 s leases
                beat = call("Heartbeat", sign_request(
                    "Heartbeat", pb.HeartbeatRequest(round=open_round[0], tokens_per_second=1000.0), worker), due)
                if beat is not None:
                    open_round[0] = max(open_round[0], beat.current_round)
                continue
            round_number = open_round[0]
            reply = call("AcquireLease", sign_request(
                "AcquireLease", pb.AcquireLeaseRequest(max_tokens=RANGE_TOKENS, round=round_number), worker), due)
            if reply is None:
                continue
            lease_answers[pb.AcquireLeaseReply.Status.Name(reply.status)] += 1
            if reply.status != pb.AcquireLeaseReply.GRANTED:
                continue
            lease = reply.lease
            report = pb.CompleteRoundRequest(
                round=round_number, loss=1.0, pseudo_gradient_digest="d" * 64, params_digest="p" * 64, group_size=1,
                leases=[pb.LeaseUsage(lease_id=lease.lease_id, tokens_consumed=lease.end - lease.start)],
            )
            call("CompleteRound", sign_request("CompleteRound", report, worker))

    pool = [threading.Thread(target=loop) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    out.put({"latencies": latencies, "errors": errors[:5], "error_count": len(errors), "cpu_seconds": time.process_time(),
             "seconds": time.perf_counter() - started, "offered_slots": len(offered),
             "served_slots": sum(1 for method in served if method != "CompleteRound"),
             "lease_answers": dict(lease_answers), "last_round": open_round[0]})


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError):
            pass
    return total


def pids_where(matches: Callable[[Path], bool]) -> list[int]:
    """The processes whose /proc entry `matches` (one that exits while looked at is left out)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if matches(entry):
                    pids.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return pids


def postgres_pids() -> list[int]:
    """The PostgreSQL server's processes (the benchmark's server runs as the postgres user)."""
    return pids_where(lambda entry: entry.stat().st_uid != 0 and (entry / "cmdline").read_bytes().startswith(b"postgres"))


def serving_processes(coordinator_pid: int) -> list[int]:
    """The coordinator's process and those it started to serve its port with it (not its DHT peer)."""
    def started_to_serve(entry: Path) -> bool:
        parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        return parent == coordinator_pid and b"spawn_main" in (entry / "cmdline").read_bytes()

    return [coordinator_pid, *pids_where(started_to_serve)]


def run_phase(address: str, workers: int, mode: str, seconds: float, coordinator_pid: int, postgres: bool) -> dict:
    # Slots per second, the whole network: a heartbeat per worker every 10 s, a lease cycle every 60 s.
    slots_per_second = (workers / 10 + workers / 60) / CLIENT_PROCESSES
    queue: mp.Queue = mp.Queue()
    db_before = {pid: cpu_seconds([pid]) for pid in postgres_pids()} if postgres else {}
    coordinator_pids = serving_processes(coordinator_pid)
    before, wall = cpu_seconds(coordinator_pids), time.perf_counter()
    processes = [mp.Process(target=client, args=(address, workers, mode, slots_per_second, seconds, p, queue))
                 for p in range(CLIENT_PROCESSES)]
    for process in processes:
        process.start()
    results = [queue.get() for _ in processes]
    for process in processes:
        process.join()
    wall = time.perf_counter() - wall
    # Server processes started during the phase (new connections) count from zero.
    database = sum(cpu_seconds([pid]) - db_before.get(pid, 0.0) for pid in postgres_pids()) if postgres else None
    figures = {"mode": mode, "coordinator_cores": (cpu_seconds(coordinator_pids) - before) / wall,
               "coordinator_processes": len(coordinator_pids),
               "load_generator_cores": sum(r["cpu_seconds"] for r in results) / wall,
               "database_cores": database / wall if postgres else None,
               "errors": sum(r["error_count"] for r in results), "error_samples": results[0]["errors"] + results[-1]["errors"],
               "lease_answers": dict(sum((collections.Counter(r["lease_answers"]) for r in results), collections.Counter())),
               "last_round": max(r["last_round"] for r in results)}
    if mode == "target":  # each slot is a heartbeat or a lease request (its report follows when granted)
        figures["served_fraction"] = sum(r["served_slots"] for r in results) / max(1, sum(r["offered_slots"] for r in results))
    answered = 0
    for method in ("Heartbeat", "AcquireLease", "CompleteRound"):
        values = sorted(v for r in results for v in r["latencies"][method])
        answered += len(values)
        if values:
            figures[method] = {"per_second": len(values) / max(r["seconds"] for r in results),
                               "p50_ms": values[len(values) // 2] * 1000, "p99_ms": values[int(len(values) * 0.99)] * 1000}
    # What one request costs the coordinator: flat from one process to two if sharing the database costs nothing.
    figures["cpu_ms_per_request"] = figures["coordinator_cores"] * wall * 1000 / max(1, answered)
    return figures


def last_target_phase(configuration: str, figures: dict) -> dict:
    """The headline: one target phase's served fraction, coordinator cores and worst p99."""
    kinds = [m for m in ("Heartbeat", "AcquireLease", "CompleteRound") if m in figures]
    return {"configuration": f"{configuration} target", "served_fraction": round(figures["served_fraction"], 4),
            "coordinator_cores": round(figures["coordinator_cores"], 4),
            "cpu_ms_per_request": round(figures["cpu_ms_per_request"], 3),
            "p99_ms": round(max((figures[m]["p99_ms"] for m in kinds), default=float("nan")), 1)}


# Rounds are decided DECISION_SECONDS after their first report, as a group that waited out its decision
# window (every report holds the same parameters): a swarm this size has many live workers without a lease
# of the open round, each an idle stake that would otherwise hold it open forever, its reports piling up.
DECISION_SECONDS = 10
RUN_TOML = ("lease_seconds = 3600\nheartbeat_seconds = 10\ntotal_rounds = 1000000\n"
            f"seq_len = {RANGE_TOKENS}\ninner_steps = 4\nbatch_size = 1\nleases_per_round = 4\n"
            f"[bounds]\ndecision_seconds = {DECISION_SECONDS}\n")


def serve(data: Path, url: str, where: Path, *extra: str):  # type: ignore[no-untyped-def]
    """A coordinator on the seeded database; (its process, its address)."""
    (where / "run.toml").write_text(RUN_TOML)
    ready, log = where / "ready.json", where / "coordinator.log"
    ready.unlink(missing_ok=True)
    coordinator = start_role(["coordinator", "serve", "--data", str(data), "--database", url, "--port", "0",
                              "--run", str(where / "run.toml"), "--ready-file", str(ready), "--no-verbose", *extra], log)
    try:
        return coordinator, wait_for_ready_file(coordinator, ready, log, timeout=120)["address"]
    except BaseException:
        stop_group(coordinator)
        raise


def benchmark(backend: str, workers: int, processes: int, args: argparse.Namespace, scratch: Path,
              database) -> list[dict]:  # type: ignore[no-untyped-def]
    """The phases of one configuration, on a freshly seeded database (`database`: the PostgreSQL server, or None)."""
    where = scratch / f"{backend}-{workers}-{processes}"
    data = where / "data"
    data.mkdir(parents=True)
    manifest = prepare_corpus(data, args.ranges)
    url = database.create_database() if database is not None else sqlite_url(where / "coordinator.db")
    started = time.perf_counter()
    seed_database(url, manifest, workers)
    print(f"[{backend}] seeded {args.ranges:,} ranges and {workers:,} workers in {time.perf_counter() - started:.0f} s",
          flush=True)
    if args.views:
        return views_comparison(data, where / "coordinator.db", where, args, workers)
    coordinator, address = serve(data, url, where, "--processes", str(processes))
    try:
        return [run_phase(address, workers, mode, seconds, coordinator.pid, database is not None)
                for mode, seconds in (("target", args.seconds), ("saturation", args.seconds / 2))]
    finally:
        stop_group(coordinator)


# -- what /metrics and the dashboard cost ----------------------------------------------------------


class Watchers:
    """Prometheus (a scrape of /metrics every scrape_seconds) and viewers polling the dashboard's JSON."""

    def __init__(self, metrics_url: str, summary_url: str, args: argparse.Namespace) -> None:
        self._loops = [(metrics_url, args.scrape_seconds)] + [(summary_url, args.poll_seconds)] * args.viewers
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._watch, args=loop, daemon=True) for loop in self._loops]
        self.answers: dict[str, int] = {"metrics": 0, "summary": 0, "failures": 0}
        self._lock = threading.Lock()

    def start(self) -> None:
        for url, _ in self._loops:  # the first readings before the measured window
            urllib.request.urlopen(url, timeout=60).read()
        for thread in self._threads:
            thread.start()

    def stop(self) -> dict[str, int]:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        return self.answers

    def _watch(self, url: str, every: float) -> None:
        while not self._stop.wait(every):
            try:
                urllib.request.urlopen(url, timeout=30).read()
                kind = "metrics" if url.endswith("/metrics") else "summary"
            except OSError:
                kind = "failures"
            with self._lock:
                self.answers[kind] += 1


def views_comparison(data: Path, seeded: Path, where: Path, args: argparse.Namespace, workers: int) -> list[dict]:
    """The target load on two coordinators at once, one without the views and one with them, each on its own
    copy of the seeded database: side by side, both share whatever else the machine does. --repeats times."""
    phases = []
    for repeat in range(args.repeats):
        started: list[tuple[subprocess.Popen[bytes], str, Watchers | None]] = []
        try:
            for views in (False, True):
                run = where / f"{'views' if views else 'plain'}-{repeat}"
                run.mkdir()
                with sqlite3.connect(seeded) as source, sqlite3.connect(run / "coordinator.db") as copy:
                    source.backup(copy)  # the same state for both: a coordinator writes to the one it serves
                ports = (free_port(), free_port())
                extra = ("--metrics-port", str(ports[0]), "--dashboard-port", str(ports[1])) if views else ()
                coordinator, address = serve(data, sqlite_url(run / "coordinator.db"), run, *extra)
                started.append((coordinator, address, Watchers(f"http://127.0.0.1:{ports[0]}/metrics",
                                                               f"http://127.0.0.1:{ports[1]}/api/summary", args)
                                if views else None))
            for _, _, watchers in started:
                if watchers:
                    watchers.start()
            with ThreadPoolExecutor(len(started)) as pool:
                measured = list(pool.map(lambda served: run_phase(served[1], workers, "target", args.seconds,
                                                                  served[0].pid, False), started))
            for figures, (_, _, watchers) in zip(measured, started):
                figures["mode"] = f"target{' + views' if watchers else ''} #{repeat + 1}"
                figures["views"] = watchers is not None
                if watchers:
                    figures["answers"] = watchers.stop()
                phases.append(figures)
        finally:
            for coordinator, _, _ in started:
                stop_group(coordinator)
    return phases


def views_headline(phases: list[dict], args: argparse.Namespace) -> dict:
    plain = sum(p["coordinator_cores"] for p in phases if not p["views"]) / args.repeats
    views = sum(p["coordinator_cores"] for p in phases if p["views"]) / args.repeats
    answers = [p["answers"] for p in phases if p["views"]]
    return {"plain_cores": round(plain, 4), "views_cores": round(views, 4), "added_cores": round(views - plain, 4),
            "added_percent": round(100 * (views - plain) / plain, 1), "target_percent": 5.0,
            "scrape_seconds": args.scrape_seconds, "poll_seconds": args.poll_seconds, "viewers": args.viewers,
            "metrics_scrapes": sum(a["metrics"] for a in answers), "summary_polls": sum(a["summary"] for a in answers),
            "failed_requests": sum(a["failures"] for a in answers)}


def report(configuration: str, phases: list[dict], headline: dict) -> None:
    for figures in phases:
        line = [f"[{configuration} {figures['mode']}] coordinator {figures['coordinator_cores']:.3f} cores "
                f"({figures['cpu_ms_per_request']:.2f} ms a request)",
                f"load generator {figures['load_generator_cores']:.2f} cores"]
        if figures["database_cores"] is not None:
            line.append(f"database {figures['database_cores']:.2f} cores")
        for method in ("Heartbeat", "AcquireLease", "CompleteRound"):
            if method in figures:
                f = figures[method]
                line.append(f"{method} {f['per_second']:,.0f}/s p50 {f['p50_ms']:.1f} ms p99 {f['p99_ms']:.1f} ms")
        if "served_fraction" in figures:
            line.append(f"served {figures['served_fraction']:.1%}")
        line.append(f"errors {figures['errors']}")
        line.append("leases " + ", ".join(f"{n} {status}" for status, n in sorted(figures["lease_answers"].items()))
                    + f"; round {figures['last_round']}")
        if "answers" in figures:
            line.append("views answered {metrics} scrapes, {summary} polls, {failures} failures".format(
                **figures["answers"]))
        print("; ".join(line), flush=True)
        if figures["errors"]:
            print("  e.g. " + " | ".join(figures["error_samples"][:3]))
        headline["phases"][f"{configuration} {figures['mode']}"] = {
            "coordinator_cores": round(figures["coordinator_cores"], 4),
            "cpu_ms_per_request": round(figures["cpu_ms_per_request"], 3), "errors": figures["errors"],
            **({"served_fraction": round(figures["served_fraction"], 4)} if "served_fraction" in figures else {}),
            **({"p99_ms": {m: round(figures[m]["p99_ms"], 1) for m in ("Heartbeat", "AcquireLease", "CompleteRound")
                           if m in figures}})}
        if figures["mode"] == "target":
            headline.update(last_target_phase(configuration, figures))


def report_views(phases: list[dict], headline: dict, args: argparse.Namespace) -> None:
    headline["views"] = views_headline(phases, args)
    v = headline["views"]
    print(f"[views] coordinator {v['plain_cores']:.3f} cores without, {v['views_cores']:.3f} with /metrics "
          f"scraped every {args.scrape_seconds:g} s and {args.viewers} viewers polling every "
          f"{args.poll_seconds:g} s: {v['added_cores']:+.3f} cores, {v['added_percent']:+.1f} % "
          f"(goal: at most +{v['target_percent']:g} %)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="10000", help="simulated workers; several: comma-separated")
    parser.add_argument("--processes", default="1", help="coordinator processes (PostgreSQL); several: comma-separated")
    parser.add_argument("--ranges", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--views", action="store_true", help="what /metrics and the dashboard cost (SQLite)")
    parser.add_argument("--repeats", type=int, default=2, help="--views: pairs of phases, without and with")
    parser.add_argument("--scrape-seconds", type=float, default=2.0, help="--views: between two scrapes of /metrics")
    parser.add_argument("--poll-seconds", type=float, default=2.0, help="--views: between two polls of each viewer")
    parser.add_argument("--viewers", type=int, default=3, help="--views: browsers polling the dashboard")
    args = parser.parse_args()
    if args.views:
        args.backends = "sqlite"
    worker_counts = [int(n) for n in args.workers.split(",")]
    process_counts = [int(n) for n in args.processes.split(",")]
    headline: dict = {"workers": worker_counts, "ranges": args.ranges, "seconds": args.seconds, "phases": {}}
    with tempfile.TemporaryDirectory(prefix="essaim-scale-") as scratch:
        for backend in args.backends.split(","):
            database = None
            if backend == "postgresql":
                from postgres import PostgresServer

                database = PostgresServer()
            try:
                for workers in worker_counts:
                    print(f"{workers:,} workers: target {workers / 10:,.0f} heartbeats/s and {workers / 60:,.0f} "
                          "lease grants/s (each reported)")
                    for processes in process_counts if backend == "postgresql" else [1]:
                        configuration = f"{backend} {workers} workers {processes} process{'es' if processes > 1 else ''}"
                        phases = benchmark(backend, workers, processes, args, Path(scratch), database)
                        report(configuration, phases, headline)
                        if args.views:
                            report_views(phases, headline, args)
            finally:
                if database is not None:
                    database.stop()
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
