"""Shard delivery over an emulated wide-area link: download throughput, and a new worker's time to its first step.

Two network namespaces (tests/wanemu.py: delay and rate on each node's link): the
coordinator in one, serving a prepared corpus over TLS; a worker machine in the other,
with an empty cache. Side by side in one run:
- coordinator: every shard fetched through ReadCorpusFile (the default), verified chunk
  by chunk and cached, by a registered worker's ShardStore, its leases prefetched side by
  side as the worker does (worker/shards.py FETCH_THREADS);
- data_url: the same shards from a static HTTP server with Range support
  (tests/http_ranges.py, Python's http.server) on the coordinator's host, read through fsspec;
- join: `essaim worker join --data EMPTY` from launch to its log's "first inner step".
Throughput is compared with the link rate (goal: >= 90 %) and with one plain TCP connection
carrying the same bytes on the same link (the emulated link's own ceiling).

Needs root (network namespaces). Usage:
  python benchmarks/shard_delivery.py [--megabytes 64] [--rate-mbit 100] [--delay-ms 25] [--repeats 2]
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from essaim.processes import kill_group, start_role, stop_group, wait_for_ready_file  # noqa: E402
from model.shards import Manifest, ShardInfo, chunk_hashes, token_dtype, write_shard  # noqa: E402

WANEMU = REPO / "tests" / "wanemu.py"
PREFIX, SUBNET = "essaimb", "10.213.11"
GOAL_LINK_FRACTION = 0.90
SHARD_TOKENS = 4 << 20  # 8 MiB per shard


def prepare(directory: Path, megabytes: float) -> Path:
    """A prepared corpus: a small real one (tokenizer, sources) plus random-token shards to reach `megabytes`."""
    from model.corpus import prepare_corpus
    from model.corpus_config import load_corpus_config
    from model.sample_corpus import write_sample_corpus

    data = directory / "data"
    prepare_corpus(load_corpus_config(write_sample_corpus(directory / "text", chars_per_language=20_000)), data,
                   vocab_size=512, shard_tokens=4096)
    manifest = Manifest.load(data / "manifest.json")
    source = manifest.sources[0]
    dtype = token_dtype(manifest.vocab_size)
    rng = np.random.default_rng(0)
    shards = []
    for i in range(max(1, round(megabytes * (1 << 20) / (SHARD_TOKENS * 2)))):
        file = f"bench-{i:03d}.bin"
        sha256 = write_shard(rng.integers(0, manifest.vocab_size, SHARD_TOKENS), data / file, dtype)
        shards.append(ShardInfo(f"bench-{i:03d}", file, sha256, SHARD_TOKENS, dtype, source.language, source.name,
                                source.licence, source.date_from, source.date_to,
                                chunk_hashes(data / file, manifest.chunk_bytes)))
    for shard in manifest.shards:
        (data / shard.file).unlink()
    Manifest(manifest.vocab_size, manifest.tokenizer_sha256, manifest.sources, shards, manifest.chunk_bytes).save(
        data / "manifest.json")
    return data


def fetch(args: argparse.Namespace) -> None:
    """In the worker's namespace: register, then read every shard whole through a fresh cache; print seconds."""
    from protocol import essaim_pb2 as pb
    from protocol.identity import Identity
    from protocol.transport import ClientTLS
    from worker.capabilities import Capabilities
    from worker.client import CoordinatorClient
    from worker.corpus_source import CoordinatorSource, UrlSource
    from worker.shards import open_store

    client = CoordinatorClient(args.coordinator, Identity.load_or_create(Path(args.cache) / "key"),
                               tls=ClientTLS(fingerprint=args.fingerprint))
    client.register("bench", "bench", Capabilities("cpu", 1 << 30, "volunteer", 0.0, "", 0.0))
    config = client.run_config()
    source = UrlSource(args.url) if args.url else CoordinatorSource(client)
    store = open_store(config, Path(args.cache), source, cache_bytes=0)
    assert store.manifest is not None
    leases = [pb.Lease(lease_id=1, shard_id=shard.shard_id, shard_file=shard.file, shard_sha256=shard.sha256,
                       shard_tokens=shard.tokens, dtype=shard.dtype, start=0, end=shard.tokens)
              for shard in store.manifest.shards]
    started = time.perf_counter()
    fetching = [store.prefetch(lease) for lease in leases]  # as the worker does with a round's leases
    total = sum(future.result().numel() * 2 for future in fetching)
    seconds = time.perf_counter() - started
    store.close()
    client.close()
    print(json.dumps({"bytes": total, "seconds": seconds}))


def on_host(i: int) -> list[str]:
    return ["ip", "netns", "exec", f"{PREFIX}{i}"]


def wanemu(*args: str) -> None:
    done = subprocess.run([sys.executable, str(WANEMU), *args, "--prefix", PREFIX], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"wanemu.py {' '.join(args)} failed: {done.stderr}")


def measure_fetch(coordinator: str, fingerprint: str, work: Path, url: str = "") -> float:
    cache = Path(tempfile.mkdtemp(dir=work, prefix="cache-"))
    command = [*on_host(1), sys.executable, __file__, "_fetch", "--coordinator", coordinator,
               "--fingerprint", fingerprint, "--cache", str(cache), *(["--url", url] if url else [])]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if done.returncode != 0:
        raise RuntimeError(f"fetch failed: {done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    shutil.rmtree(cache)
    return result["bytes"] * 8 / result["seconds"] / 1e6  # Mbit/s


def measure_tcp(nbytes: int) -> float:
    """The link's own ceiling: the same bytes over one plain TCP connection (Python sockets), in Mbit/s."""
    sender = subprocess.Popen([*on_host(0), sys.executable, "-c", (
        "import socket\n"
        f"s = socket.create_server(('{SUBNET}.1', 9000)); c, _ = s.accept(); piece = bytes(1 << 20)\n"
        f"for _ in range({nbytes >> 20}): c.sendall(piece)\n"
        "c.close()")], start_new_session=True)
    try:
        done = subprocess.run([*on_host(1), sys.executable, "-c", (
            "import socket, time\n"
            "for _ in range(100):\n"
            f"    try: c = socket.create_connection(('{SUBNET}.1', 9000)); break\n"
            "    except OSError: time.sleep(0.1)\n"
            "t, n = time.perf_counter(), 0\n"
            "while (d := c.recv(1 << 20)): n += len(d)\n"
            "print(n * 8 / (time.perf_counter() - t) / 1e6)")], capture_output=True, text=True, timeout=600)
        return float(done.stdout.strip())
    finally:
        sender.wait(timeout=30)


def measure_join(coordinator: str, fingerprint: str, work: Path, name: str) -> float:
    """Seconds from `essaim worker join` on an empty cache to its first inner step."""
    log = work / f"{name}.log"
    started = time.monotonic()
    worker = start_role(["worker", "join", "--coordinator", coordinator, "--coordinator-fingerprint", fingerprint,
                         "--identity", str(work / f"{name}.key"), "--data", str(work / f"{name}-data"),
                         "--host", f"{SUBNET}.2", "--device", "cpu"],
                        log, env={"OMP_NUM_THREADS": "1"}, wrapper=on_host(1))
    try:
        while "first inner step" not in (log.read_text(errors="replace") if log.exists() else ""):
            if worker.poll() is not None or time.monotonic() - started > 600:
                raise RuntimeError(f"the worker did not train: {log.read_text()[-3000:]}")
            time.sleep(0.1)
        return time.monotonic() - started
    finally:
        stop_group(worker)
        if worker.poll() is None:
            kill_group(worker)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="run", choices=["run", "_fetch"])
    parser.add_argument("--megabytes", type=float, default=64)
    parser.add_argument("--rate-mbit", type=float, default=100)
    parser.add_argument("--delay-ms", type=float, default=25)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--coordinator", default="")
    parser.add_argument("--fingerprint", default="")
    parser.add_argument("--cache", default="")
    parser.add_argument("--url", default="")
    args = parser.parse_args()
    if args.mode == "_fetch":
        return fetch(args)

    from protocol.transport import write_self_signed

    work = Path(tempfile.mkdtemp(prefix="essaim-shard-delivery-"))
    os.environ["ESSAIM_SOCKET_DIR"] = str(work)  # hivemind's sockets go with the work directory, even if a peer is killed
    processes = []
    subprocess.run([sys.executable, str(WANEMU), "down", "--prefix", PREFIX], capture_output=True)
    try:
        data = prepare(work, args.megabytes)
        corpus_bytes = sum(s.size_bytes for s in Manifest.load(data / "manifest.json").shards)
        wanemu("up", "-n", "2", "--delay-ms", str(args.delay_ms), "--rate-mbit", str(args.rate_mbit),
               "--subnet", SUBNET)
        cert, key = write_self_signed(work / "tls", [f"{SUBNET}.1"])
        (work / "run.toml").write_text("total_rounds = 1000\ninner_steps = 5\nbatch_size = 4\nseq_len = 64\n"
                                       "target_group_size = 1\n")
        coordinator = start_role(
            ["coordinator", "serve", "--data", str(data), "--database", f"sqlite:///{work / 'c.db'}",
             "--host", f"{SUBNET}.1", "--port", "50051", "--tls-cert", str(cert), "--tls-key", str(key),
             "--run", str(work / "run.toml"), "--ready-file", str(work / "ready.json")],
            work / "coordinator.log", wrapper=on_host(0))
        processes.append(coordinator)
        ready = wait_for_ready_file(coordinator, work / "ready.json", work / "coordinator.log", timeout=120)
        http = subprocess.Popen([*on_host(0), sys.executable, str(REPO / "tests" / "http_ranges.py"), str(data),
                                 f"{SUBNET}.1", "8080"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        processes.append(http)
        rates: dict[str, list[float]] = {"plain TCP (the link's ceiling)": [], "coordinator (gRPC stream)": [],
                                         "data_url (HTTP Range)": []}
        joins: list[float] = []
        for repeat in range(args.repeats):
            rates["plain TCP (the link's ceiling)"].append(measure_tcp(corpus_bytes))
            rates["coordinator (gRPC stream)"].append(measure_fetch(ready["address"], ready["fingerprint"], work))
            rates["data_url (HTTP Range)"].append(
                measure_fetch(ready["address"], ready["fingerprint"], work, f"http://{SUBNET}.1:8080"))
            joins.append(measure_join(ready["address"], ready["fingerprint"], work, f"join{repeat}"))
    finally:
        for process in processes:
            stop_group(process)
            if process.poll() is None:
                kill_group(process)
        wanemu("down")
    print(f"link: {args.rate_mbit:g} Mbit/s each way, {args.delay_ms:g} ms one-way delay per node; "
          f"corpus {corpus_bytes / 2**20:.0f} MiB in {corpus_bytes // (SHARD_TOKENS * 2)} shards, TLS on")
    print(f"{'source':<32}{'median Mbit/s':>15}{'of link':>10}{'runs':>26}")
    for source, values in rates.items():
        median = statistics.median(values)
        print(f"{source:<32}{median:>15.1f}{median / args.rate_mbit:>10.1%}{', '.join(f'{v:.1f}' for v in values):>26}")
    print(f"worker join on an empty cache -> first inner step: median {statistics.median(joins):.1f} s "
          f"({', '.join(f'{v:.1f}' for v in joins)})")
    coordinator_rate = statistics.median(rates["coordinator (gRPC stream)"])
    print(json.dumps({
        "link_mbit": args.rate_mbit, "delay_ms": args.delay_ms, "corpus_mib": round(corpus_bytes / 2**20, 1),
        "coordinator_mbit": round(coordinator_rate, 1),
        "coordinator_link_fraction": round(coordinator_rate / args.rate_mbit, 3),
        "data_url_mbit": round(statistics.median(rates["data_url (HTTP Range)"]), 1),
        "plain_tcp_mbit": round(statistics.median(rates["plain TCP (the link's ceiling)"]), 1),
        "join_to_first_step_s": round(statistics.median(joins), 1),
        "goal_link_fraction": GOAL_LINK_FRACTION,
    }))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
