"""DiLoCo (Essaim, four wire compressions) against synchronous data-parallel training.

Same model preset and seed, same tokens, same number of workers, local batch and
sequence length. `ddp` trains S steps with torch.distributed DDP (gloo), a gradient
all-reduce every step, once per learning rate of --ddp-lrs (its batch is N times a
worker's: the rate that suits it is not DiLoCo's inner one), each with a linear warmup
over --ddp-warmup steps; the DDP run with the lowest eval loss is the baseline ("tuned
DDP"). `none`, `fp16`, `8bit` and `topk2bit` (top-k + 2-bit, run without spot checks:
worker/sparse_codec.py) run a real coordinator and `essaim worker join` processes for
R = S / H DiLoCo rounds of H inner steps (16 by default). `8bit+overlap` and
`topk2bit+overlap` average each round while the next one trains, the outer step landing
one round late (RunConfig.overlap_averaging): what hiding the sync costs in loss.

Measured per variant: loss on held-out tokens, bytes per worker, wall time, compute
utilisation and whether all replicas end identical. Bytes: with --wan DELAY_MS,RATE_MBIT
(root) every process runs in its own network namespace behind an emulated WAN link
(tests/wanemu.py) and the ratio compares what left each node's interface (TX counters,
everything on the wire: DHT, heartbeats, TCP); on loopback it compares what each side
counts (DDP: what a ring all-reduce of its real gradient buckets sends; DiLoCo: what each
worker reports per round). Utilisation: DDP's training loop time less its all-reduce wait
(see CommMeter) over the loop time; DiLoCo's time in inner steps of kept rounds over the
worker's whole training span, from its first round's start to its last report, so rounds
it trained and lost (refused, not kept, caught up) count against it. The goals: at least
3000x fewer bytes than the tuned DDP at no more than 3 % higher eval loss (and, with
--wan, at least 95 % utilisation). The defaults take roughly 30-40 minutes on a 2-core
machine on loopback.

Usage: python benchmarks/diloco_vs_ddp.py [--steps 1600 --inner-steps 100 --workers 4 --preset tiny]
       [--variants ddp,none,fp16,8bit,topk2bit,8bit+overlap,topk2bit+overlap]
       [--ddp-lrs 0.001,0.002,0.004,0.008] [--ddp-warmup 100] [--error-feedback] [--wan 100,50] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from coordinator.mixture import mixture_order
from essaim.processes import stop_group, wait_for_ready_file
from model.corpus import prepare_corpus
from model.corpus_config import load_corpus_config
from model.evaluate import mean_loss
from model.presets import build_model
from model.sample_corpus import write_sample_corpus
from model.shards import Manifest, ShardInfo, read_tokens, write_shard
from protocol.choices import UNCHECKABLE_COMPRESSIONS
from worker.data import batches

# A DiLoCo variant is its compression, "+overlap" for averaging hidden behind the next round (one round late).
VARIANTS = ("ddp", "none", "fp16", "8bit", "topk2bit", "8bit+overlap", "topk2bit+overlap")
EVAL_ROWS_PER_SHARD = 64
CHARS_PER_LANGUAGE = 3_000_000  # ~2.9 M tokens at vocab 1024; longer runs go round it in epochs
WANEMU = Path(os.environ.get("WANEMU", Path(__file__).resolve().parents[1] / "tests" / "wanemu.py"))
GOAL_BYTES_RATIO, GOAL_LOSS_PERCENT, GOAL_UTILISATION = 3000.0, 3.0, 0.95


@dataclass(frozen=True)
class Settings:
    preset: str = "tiny"
    vocab: int = 1024
    steps: int = 1600
    inner_steps: int = 100
    ddp_warmup: int = 100        # DDP's linear learning-rate warmup, in steps
    batch: int = 8
    seq_len: int = 128
    workers: int = 4
    seed: int = 0
    inner_lr: float = 0.002
    outer_lr: float = 0.9
    outer_momentum: float = 0.3  # short runs overshoot with DiLoCo's usual 0.9 (see essaim/demo.py)
    error_feedback: bool = False
    leases_per_round: int = 4   # each DiLoCo worker's round mixes this many leases (see RunSettings)

    @property
    def rounds(self) -> int:
        return self.steps // self.inner_steps

    @property
    def lease_tokens(self) -> int:
        """Tokens of one lease: a worker trains leases_per_round of them per round (round_seconds = 0)."""
        return self.inner_steps * self.batch * self.seq_len // self.leases_per_round


@dataclass
class Result:
    variant: str                # "ddp lr=..." for each DDP rate swept
    eval_loss: float
    sent: list[int]             # bytes each worker sent, as counted
    tx: list[int] | None        # bytes that left each worker's namespace (--wan only)
    wall_seconds: float         # first process started -> last one exited
    train_seconds: float        # DDP: the training loop; DiLoCo: the sum of round walls
    utilisation: list[float]    # per worker
    identical: bool             # every replica ends with the same weights


# -- data -------------------------------------------------------------------------------------


def prepare_data(root: Path, settings: Settings) -> torch.Tensor:
    """Prepare the corpus in root/data and return the held-out evaluation tokens.

    The eval tokens are the last EVAL_ROWS_PER_SHARD rows of every shard, cut out of the
    shard files before any variant starts: the coordinator and the DDP ranks only ever see
    the shortened shards (rewritten, with a new sha256 and manifest), so no variant can
    train on them, in any epoch. Each shard's training part is also cut to whole leases,
    and the lease count to a multiple of the workers, so every round is N full leases of
    H steps, and the DDP ranks train exactly those leases' rows in the same round.
    """
    config = write_sample_corpus(root / "text", CHARS_PER_LANGUAGE)
    data = root / "data"
    manifest, _ = prepare_corpus(load_corpus_config(config), data, vocab_size=settings.vocab, shard_tokens=1 << 26)
    held_out = EVAL_ROWS_PER_SHARD * settings.seq_len
    leases = {s.shard_id: max(0, (s.tokens - held_out) // settings.lease_tokens) for s in manifest.shards}
    for _ in range(sum(leases.values()) % (settings.workers * settings.leases_per_round)):
        leases[max(leases, key=leases.__getitem__)] -= 1
    if sum(leases.values()) == 0:
        raise SystemExit(f"the sample corpus has no {settings.workers} leases of {settings.lease_tokens} tokens: "
                         "lower --inner-steps, --batch or --workers")
    shards, eval_parts = [], []
    for shard in manifest.shards:
        tokens = read_tokens(data / shard.file, shard.dtype, 0, shard.tokens)
        tail = tokens[-held_out:]
        eval_parts.append(torch.from_numpy(tail[len(tail) % settings.seq_len :]))  # whole rows only
        (data / shard.file).unlink()
        if leases[shard.shard_id]:
            train = tokens[: leases[shard.shard_id] * settings.lease_tokens]
            shards.append(replace(shard, sha256=write_shard(train, data / shard.file, shard.dtype), tokens=len(train)))
    # Weights equal to the sources' sizes: the mixture reads every lease once, no source repeats.
    sizes = {s.name: sum(shard.tokens for shard in shards if shard.source == s.name) for s in manifest.sources}
    sources = [replace(s, weight=float(sizes[s.name])) for s in manifest.sources]
    Manifest(manifest.vocab_size, manifest.tokenizer_sha256, sources, shards).save(data / "manifest.json")
    return torch.cat(eval_parts)


def lease_order(manifest: Manifest, lease_tokens: int) -> list[tuple[ShardInfo, int]]:
    """(shard, start) of an epoch's leases in the coordinator's order (coordinator.mixture, oldest first)."""
    pending = {
        source.name: [(shard, start) for shard in sorted((s for s in manifest.shards if s.source == source.name),
                                                         key=lambda s: (s.date_from, s.shard_id))
                      for start in range(0, shard.tokens, lease_tokens)]
        for source in manifest.sources
    }
    weights = {s.name: s.weight for s in manifest.sources if pending[s.name]}
    assigned: dict[str, int] = {}
    order = []
    while any(pending.values()):
        source = mixture_order(weights, assigned)[0]
        order.append(pending[source].pop(0))
        assigned[source] = assigned.get(source, 0) + lease_tokens
    return order


def digest(model: torch.nn.Module) -> str:
    sha = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        sha.update(name.encode() + tensor.detach().contiguous().numpy().tobytes())
    return sha.hexdigest()


def evaluate(model_dir: Path, eval_tokens: torch.Tensor, seq_len: int) -> tuple[float, str]:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return mean_loss(model, eval_tokens, seq_len), digest(model)


# -- processes and the emulated WAN -----------------------------------------------------------


class Network:
    """Where node i runs: loopback, or network namespace wan<i> of wanemu.py (10.213.0.<i+1>)."""

    def __init__(self, wan: tuple[float, float] | None, nodes: int) -> None:
        self.wan, self.nodes, self.device = wan, nodes, "lo"

    def __enter__(self) -> Network:
        if self.wan:
            self._wanemu("up", "-n", str(self.nodes), "--delay-ms", str(self.wan[0]), "--rate-mbit", str(self.wan[1]))
            try:  # wanemu's TUN mode names the node's device wan0, its netem mode eth0: ask.
                names = subprocess.run([*self.prefix(0), "ls", "/sys/class/net"], capture_output=True, text=True)
                self.device = next(name for name in names.stdout.split() if name != "lo")
            except BaseException:
                self._wanemu("down")
                raise
        return self

    def __exit__(self, *_: object) -> None:
        if self.wan:
            self._wanemu("down")

    def _wanemu(self, *args: str) -> None:
        done = subprocess.run([sys.executable, str(WANEMU), *args], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"wanemu.py {' '.join(args)} failed:\n{done.stderr}")

    def prefix(self, node: int) -> list[str]:
        return ["ip", "netns", "exec", f"wan{node}"] if self.wan else []

    def address(self, node: int) -> str:
        return f"10.213.0.{node + 1}" if self.wan else "127.0.0.1"

    def tx_bytes(self, nodes: list[int]) -> list[int] | None:
        if not self.wan:
            return None
        path = f"/sys/class/net/{self.device}/statistics/tx_bytes"
        return [int(subprocess.run([*self.prefix(n), "cat", path], capture_output=True, check=True).stdout)
                for n in nodes]


def tx_since(network: Network, nodes: list[int], before: list[int] | None) -> list[int] | None:
    after = network.tx_bytes(nodes)
    return None if after is None or before is None else [a - b for a, b in zip(after, before)]


def spawn(command: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """essaim.processes.start_role for any command (here with an `ip netns exec` prefix): own session."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:  # the child keeps its own descriptor
        # One thread per process: several share this machine's cores (FIELD-NOTES, oversubscription).
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def wait_all(processes: list[subprocess.Popen[bytes]], logs: list[Path], timeout: float) -> float:
    """Wait until every process exited, and successfully; returns the seconds waited."""
    started = time.monotonic()
    while any(p.poll() is None for p in processes):
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"still running after {timeout:.0f} s (--timeout): see {logs[0].parent}")
        time.sleep(0.2)
    for process, log in zip(processes, logs):
        if process.returncode != 0:
            raise RuntimeError(f"{log.stem} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
    return time.monotonic() - started


# -- DDP --------------------------------------------------------------------------------------


class CommMeter:
    """A DDP comm hook that counts bytes and waiting, then all-reduces (averages) the real bucket.

    Bytes are computed from each real gradient bucket as what a ring all-reduce sends per
    rank, 2(N-1)/N x bucket bytes: the bandwidth-optimal figure (gloo may send more; in
    --wan mode the interface counters show what really left each namespace). DDP's one
    parameter broadcast at construction is not counted. DDP waits for every bucket's
    all-reduce when backward() returns: the communication wait is how long the last
    all-reduce ran past the last bucket's launch, i.e. past the end of gradient compute.
    DDP utilisation = (training loop time - that wait) / training loop time.
    """

    def __init__(self, world: int) -> None:
        self.world, self.bytes_sent, self.wait_seconds = world, 0, 0.0
        self._launched = self._done = 0.0

    def hook(self, _state, bucket):  # type: ignore[no-untyped-def]  # DDP refuses string annotations here
        import torch.distributed as dist

        tensor = bucket.buffer()
        self.bytes_sent += 2 * (self.world - 1) * tensor.numel() * tensor.element_size() // self.world
        tensor.div_(self.world)
        self._launched = time.perf_counter()

        def finished(future: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
            self._done = time.perf_counter()
            return future.value()[0]

        return dist.all_reduce(tensor, async_op=True).get_future().then(finished)

    def end_backward(self) -> None:
        self.wait_seconds += max(0.0, self._done - self._launched)


def ddp_rank(rank: int, job_path: Path) -> None:
    """One DDP rank, a child process of this script: train S steps, write its figures."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    job = json.loads(job_path.read_text())
    settings, data, out = Settings(**job["settings"]), Path(job["data"]), Path(job["out"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=settings.workers)  # MASTER_ADDR/PORT from env
    try:
        manifest = Manifest.load(data / "manifest.json")
        order = lease_order(manifest, settings.lease_tokens)
        model = build_model(settings.preset, manifest.vocab_size, settings.seed)
        # The buffers (rotary frequencies) are the same everywhere: no broadcast every step.
        ddp = DistributedDataParallel(model, forward_sync_buffers=False)
        meter = CommMeter(settings.workers)
        ddp.register_comm_hook(None, meter.hook)
        optimizer = torch.optim.AdamW(model.parameters(), lr=settings.inner_lr)
        warmup = max(settings.ddp_warmup, 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        started = time.perf_counter()
        for round_number in range(settings.rounds):
            # This round's N x L DiLoCo leases: the same rows, L per rank, a batch from each in turn, as a
            # DiLoCo worker trains them. (Which worker gets which lease is a race there; DDP, averaging
            # every step, does not care which rank trains which.)
            per_round = settings.workers * settings.leases_per_round
            mine = [order[(round_number * per_round + rank + settings.workers * j) % len(order)]
                    for j in range(settings.leases_per_round)]
            streams = [batches(torch.from_numpy(read_tokens(data / shard.file, shard.dtype, start,
                                                            start + settings.lease_tokens)),
                               settings.batch, settings.seq_len) for shard, start in mine]
            for rows in (rows for turn in zip(*streams) for rows in turn):
                ddp(input_ids=rows, labels=rows).loss.backward()
                meter.end_backward()
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
        loop = time.perf_counter() - started
        figures = {"bytes": meter.bytes_sent, "wait": meter.wait_seconds, "loop": loop, "digest": digest(model)}
        (out / f"rank{rank}.json").write_text(json.dumps(figures))
        if rank == 0:
            model.save_pretrained(out / "model")
        dist.barrier()  # no rank tears gloo down while another still uses it (that aborted a rank)
    finally:
        dist.destroy_process_group()


def run_ddp(settings: Settings, root: Path, network: Network, eval_tokens: torch.Tensor, timeout: float) -> Result:
    """DDP at settings.inner_lr (one of the rates swept)."""
    out = root / f"ddp-{settings.inner_lr:g}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    job = out / "job.json"
    job.write_text(json.dumps({"settings": asdict(settings), "data": str(root / "data"), "out": str(out)}))
    with socket.socket() as s:  # a free port for rank 0's rendezvous (its own namespace under --wan)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": network.address(0), "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": network.device}
    nodes = list(range(settings.workers))  # rank i on node i
    logs = [out / f"rank{r}.log" for r in nodes]
    before = network.tx_bytes(nodes)
    ranks: list[subprocess.Popen[bytes]] = []
    try:
        for r in nodes:
            script = str(Path(__file__).resolve())
            ranks.append(spawn([*network.prefix(r), sys.executable, script, "--ddp-rank", str(r), "--ddp-job", str(job)],
                               logs[r], env))
        wall = wait_all(ranks, logs, timeout)
    finally:
        for process in ranks:
            stop_group(process)
    figures = [json.loads((out / f"rank{r}.json").read_text()) for r in nodes]
    loss, _ = evaluate(out / "model", eval_tokens, settings.seq_len)
    return Result(f"ddp lr={settings.inner_lr:g}", loss, [f["bytes"] for f in figures],
                  tx_since(network, nodes, before), wall, max(f["loop"] for f in figures),
                  [1 - f["wait"] / f["loop"] for f in figures],
                  len({f["digest"] for f in figures}) == 1)


# -- DiLoCo -----------------------------------------------------------------------------------


def run_toml(settings: Settings, variant: str) -> str:
    compression, _, overlap = variant.partition("+")
    values = {
        "model_preset": settings.preset, "seed": settings.seed, "seq_len": settings.seq_len,
        "batch_size": settings.batch, "inner_steps": settings.inner_steps, "inner_lr": settings.inner_lr,
        "outer_lr": settings.outer_lr, "outer_momentum": settings.outer_momentum, "total_rounds": settings.rounds,
        "target_group_size": settings.workers, "matchmaking_seconds": 20.0, "averaging_timeout_seconds": 60.0,
        "heartbeat_seconds": 2, "compression": compression, "error_feedback": settings.error_feedback,
        "round_seconds": 0.0,  # every worker trains exactly inner_steps steps per round, like a DDP rank
        "leases_per_round": settings.leases_per_round,
        # No validator runs here; a sparse codec's run must say it has no spot checks (coordinator/config.py),
        # and so must an overlapped one (a round starts where no validator could replay it from).
        **({"verify_fraction": 0.0} if compression in UNCHECKABLE_COMPRESSIONS or overlap else {}),
        **({"overlap_averaging": True} if overlap else {}),
    }
    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items())


def run_diloco(settings: Settings, variant: str, root: Path, network: Network, eval_tokens: torch.Tensor,
               timeout: float) -> Result:
    out = root / f"diloco-{variant.replace('+', '-')}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / "run.toml").write_text(run_toml(settings, variant))
    database = f"sqlite:///{out / 'coordinator.db'}"
    essaim = [sys.executable, "-m", "essaim"]
    nodes = [i + 1 for i in range(settings.workers)]  # worker i on node i + 1; node 0 is the coordinator's
    logs = [out / f"w{i}.log" for i in range(settings.workers)]
    tls: list[str] = []
    if network.wan:  # off loopback the coordinator serves TLS only, as on a real wide-area network
        from protocol.transport import write_self_signed

        cert, key = write_self_signed(out / "tls", [network.address(0)])
        tls = ["--tls-cert", str(cert), "--tls-key", str(key)]
    coordinator = spawn([*network.prefix(0), *essaim, "coordinator", "serve", "--data", str(root / "data"),
                         "--database", database, "--host", network.address(0), "--port", "0", *tls,
                         "--run", str(out / "run.toml"), "--ready-file", str(out / "ready.json")], out / "coordinator.log")
    workers: list[subprocess.Popen[bytes]] = []
    try:
        ready = wait_for_ready_file(coordinator, out / "ready.json", out / "coordinator.log", 180.0)
        address = ready["address"]
        pinned = ["--coordinator-fingerprint", ready["fingerprint"]] if tls else []
        before = network.tx_bytes(nodes)
        for i, node in enumerate(nodes):
            workers.append(spawn([*network.prefix(node), *essaim, "worker", "join", "--coordinator", address, *pinned,
                                  "--host", network.address(node), "--identity", str(out / "keys" / f"w{i}.key"),
                                  "--name", f"w{i}", "--checkpoint-dir", str(out / f"checkpoint{i}")], logs[i]))
        wall = wait_all(workers, logs, timeout)
        tx = tx_since(network, nodes, before)
    finally:
        for process in (*workers, coordinator):
            stop_group(process)
    rows = contributions(database, settings)
    spans = training_spans(database)
    evaluated = [evaluate(latest_checkpoint(out / f"checkpoint{i}"), eval_tokens, settings.seq_len)
                 for i in range(settings.workers)]
    return Result(variant, evaluated[0][0], [sum(c.bytes_sent for c in r) for r in rows], tx, wall,
                  float(np.mean(list(spans.values()))),
                  [sum(c.inner_seconds for c in r) / spans[r[0].worker_id] for r in rows],
                  len({d for _, d in evaluated}) == 1)


def contributions(database: str, settings: Settings) -> list[list]:  # type: ignore[type-arg]
    """The coordinator's (round, worker) records, one list per worker; warns about missing rounds."""
    from sqlalchemy import select

    from coordinator import store

    if not hasattr(store, "Contribution"):
        raise RuntimeError("coordinator.store has no Contribution table: this Essaim records no per-round costs")
    with store.session_factory(store.open_engine(database))() as session:
        rows = session.scalars(select(store.Contribution)).all()
    if not rows:
        raise RuntimeError(f"the coordinator recorded no rounds in {database}")
    per_worker: dict[str, list] = {}  # type: ignore[type-arg]
    for row in rows:
        per_worker.setdefault(row.worker_id, []).append(row)
    # A worker left out of a group gives its round back and catches up: fewer rows, smaller groups.
    rounds = sorted(len(r) for r in per_worker.values())
    small = sorted({(r.round, r.group_size) for r in rows if r.group_size != settings.workers})
    if rounds != [settings.rounds] * settings.workers or small:
        print(f"  warning: expected {settings.rounds} rounds of {settings.workers} workers; rounds per worker "
              f"{rounds}, (round, group size) below {settings.workers}: {small}", flush=True)
    return list(per_worker.values())


def training_spans(database: str) -> dict[str, float]:
    """Each worker's training span: from its first round's start to its last report's arrival, every round it
    filed (kept or not) and every round it gave up on inside. A report's wall_seconds runs from the end of
    the worker's previous round (or the start of its training loop) to the report."""
    from sqlalchemy import select

    from coordinator import store

    with store.session_factory(store.open_engine(database))() as session:
        reports = session.scalars(select(store.FiledReport)).all()
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for filed in reports:
        started = filed.received_at - json.loads(filed.report)["wall_seconds"]
        first[filed.worker_id] = min(first.get(filed.worker_id, started), started)
        last[filed.worker_id] = max(last.get(filed.worker_id, filed.received_at), filed.received_at)
    return {worker: last[worker] - first[worker] for worker in first}


def latest_checkpoint(directory: Path) -> Path:
    pointer = directory / "latest"
    if not pointer.is_file():
        raise RuntimeError(f"{directory} has no `latest` file naming the worker's newest checkpoint")
    return directory / pointer.read_text().strip()


# -- report -----------------------------------------------------------------------------------


def megabytes(values: list[int] | None) -> str:
    return "-" if values is None else f"{np.mean(values) / 1e6:,.3f} ({max(values) / 1e6:,.3f})"


def report(results: list[Result], wan: bool) -> None:
    """The table, the goals' verdicts against the tuned DDP, and the JSON line of headline figures."""
    swept = [r for r in results if r.variant.startswith("ddp")]
    ddp = min(swept, key=lambda r: r.eval_loss) if swept else None
    on_wire = wan  # with --wan both sides' bytes are counted on the interfaces; on loopback as each side counts
    width = max(16, *(len(r.variant) + 2 for r in results))
    header = (f"{'variant':{width}} {'eval loss':>9} {'vs DDP':>7} {'MB sent/worker (max)':>21} {'MB TX/worker (max)':>19} "
              f"{'DDP/x':>6} {'wall s':>7} {'train s':>7} {'util':>6}  identical")
    print("\n" + header + "\n" + "-" * len(header))
    verdicts, headline = [], {}
    for r in results:
        utilisation = float(np.mean(r.utilisation))
        ratio = delta = None
        if ddp is not None and r not in swept:
            ratio = float(np.mean(ddp.tx) / np.mean(r.tx)) if on_wire else float(np.mean(ddp.sent) / np.mean(r.sent))
            delta = 100 * (r.eval_loss - ddp.eval_loss) / ddp.eval_loss
        name = r.variant + (" *" if r is ddp and len(swept) > 1 else "")
        print(f"{name:{width}} {r.eval_loss:9.4f} {'-' if delta is None else f'{delta:+.2f}%':>7} "
              f"{megabytes(r.sent):>21} {megabytes(r.tx):>19} {'-' if ratio is None else f'{ratio:.0f}x':>6} "
              f"{r.wall_seconds:7.1f} {r.train_seconds:7.1f} {100 * utilisation:5.1f}%  {'yes' if r.identical else 'NO'}")
        per_worker = float(np.mean(r.tx if on_wire else r.sent))
        headline[r.variant] = {"eval_loss": round(r.eval_loss, 4), "utilisation": round(utilisation, 4),
                               "identical": r.identical, "mb_per_worker": round(per_worker / 1e6, 4),
                               **({"bytes_ratio": round(ratio, 1), "loss_gap_percent": round(delta, 2)}
                                  if ratio is not None and delta is not None else {})}
        if ratio is not None and delta is not None:
            failed = [f"{ratio:.0f}x fewer bytes"] if ratio < GOAL_BYTES_RATIO else []
            failed += [f"loss {delta:+.2f}%"] if delta > GOAL_LOSS_PERCENT else []
            failed += [f"utilisation {100 * utilisation:.1f}%"] if wan and utilisation < GOAL_UTILISATION else []
            verdicts.append((r.variant, failed))
    if len(swept) > 1:
        print(f"* the tuned DDP: the lowest eval loss of the {len(swept)} learning rates swept")
    print("bytes compared: " + ("on the wire (interface TX counters)" if on_wire else
                                "as each side counts them (loopback has no per-node interface)"))
    goal = (f"at least {GOAL_BYTES_RATIO:.0f}x fewer bytes than the tuned DDP at no more than {GOAL_LOSS_PERCENT:.0f}% "
            "higher eval loss" + (f" and at least {100 * GOAL_UTILISATION:.0f}% compute utilisation" if wan else ""))
    if not verdicts:
        print(f"\ngoals ({goal}): not checked, that needs ddp and a DiLoCo variant")
    else:
        met = [variant for variant, failed in verdicts if not failed]
        details = "; ".join(f"{variant}: {', '.join(failed) or 'met'}" for variant, failed in verdicts)
        print(f"\ngoals ({goal}): {'HOLD with ' + ', '.join(met) if met else 'DO NOT HOLD'} ({details})")
    print(json.dumps({"tuned_ddp": ddp.variant if ddp else None, "bytes_on_wire": on_wire, "variants": headline}))


def print_settings(settings: Settings, eval_tokens: torch.Tensor, data: Path, wan: tuple[float, float] | None) -> None:
    manifest = Manifest.load(data / "manifest.json")
    model = build_model(settings.preset, manifest.vocab_size, settings.seed)
    epoch = sum(s.tokens for s in manifest.shards)
    total = settings.workers * settings.steps * settings.batch * settings.seq_len
    print(f"model {settings.preset}: {sum(p.numel() for p in model.parameters()):,} parameters, vocab "
          f"{manifest.vocab_size}, seed {settings.seed}; {settings.workers} workers x batch {settings.batch} x "
          f"seq_len {settings.seq_len}")
    print(f"DDP: {settings.steps} steps of AdamW, linear warmup over {settings.ddp_warmup} steps, at each rate of "
          f"--ddp-lrs. DiLoCo: {settings.rounds} rounds x "
          f"{settings.inner_steps} inner AdamW steps, lr {settings.inner_lr}; outer Nesterov lr {settings.outer_lr}, "
          f"momentum {settings.outer_momentum}; error feedback {'on' if settings.error_feedback else 'off'}")
    print(f"tokens trained per variant: {total:,} ({total / epoch:.2f} epochs of {epoch:,}); held-out eval tokens: "
          f"{eval_tokens.numel():,}, loss before training {mean_loss(model, eval_tokens, settings.seq_len):.4f}")
    print("network: " + (f"emulated WAN, {wan[0]:g} ms one-way delay, {wan[1]:g} Mbit/s per node" if wan else "loopback"))


# -- command line -----------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = Settings()
    for name in ("preset", "vocab", "steps", "inner_steps", "batch", "seq_len", "workers", "seed",
                 "inner_lr", "outer_lr", "outer_momentum", "ddp_warmup"):
        value = getattr(defaults, name)
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    parser.add_argument("--error-feedback", action="store_true", help="carry compression residuals across rounds")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="a comma-separated subset of the default")
    parser.add_argument("--ddp-lrs", default="", metavar="LR,LR,...",
                        help="DDP's learning rates to sweep (default: 0.5x, 1x, 2x and 4x --inner-lr)")
    parser.add_argument("--wan", default="", metavar="DELAY_MS,RATE_MBIT", help="emulated WAN per node (needs root)")
    parser.add_argument("--workdir", type=Path, help="keep corpus, logs and checkpoints here (default: a tempdir)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one variant may run")
    parser.add_argument("--ddp-rank", type=int, help=argparse.SUPPRESS)  # the DDP ranks' entry
    parser.add_argument("--ddp-job", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ddp_rank is not None:
        return ddp_rank(args.ddp_rank, args.ddp_job)

    settings = Settings(**{k: v for k, v in vars(args).items() if k in Settings.__dataclass_fields__})
    variants = args.variants.split(",")
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}: choose from {','.join(VARIANTS)}")
    if settings.steps % settings.inner_steps:
        parser.error(f"--steps ({settings.steps}) must be a multiple of --inner-steps ({settings.inner_steps})")
    try:
        ddp_lrs = [float(x) for x in args.ddp_lrs.split(",")] if args.ddp_lrs else [settings.inner_lr * k for k in (0.5, 1, 2, 4)]
    except ValueError:
        parser.error(f"--ddp-lrs takes learning rates separated by commas, e.g. 0.002,0.004: not {args.ddp_lrs!r}")
    if not all(lr > 0 for lr in ddp_lrs):
        parser.error(f"--ddp-lrs: learning rates must be positive, not {ddp_lrs}")
    if settings.rounds < 16:
        print(f"note: {settings.rounds} DiLoCo rounds; the published comparison runs at least 16", flush=True)
    wan = tuple(float(x) for x in args.wan.split(",")) if args.wan else None
    if wan is not None and len(wan) != 2:
        parser.error("--wan takes DELAY_MS,RATE_MBIT, e.g. --wan 100,50")
    if wan is not None and os.geteuid() != 0:
        parser.error("--wan needs root: it builds network namespaces (run as root, e.g. with sudo)")
    if wan is not None and not WANEMU.is_file():
        parser.error(f"--wan needs the WAN emulator, not found at {WANEMU}: set WANEMU=/path/to/wanemu.py")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanups below on SIGTERM too

    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="essaim-bench-")))
        else:
            root = args.workdir.resolve()
            shutil.rmtree(root / "data", ignore_errors=True)
            root.mkdir(parents=True, exist_ok=True)
        # hivemind's unix sockets: a short private parent, removed even after a killed peer.
        os.environ["ESSAIM_SOCKET_DIR"] = stack.enter_context(tempfile.TemporaryDirectory(prefix="eb-", dir="/tmp"))
        network = stack.enter_context(Network(wan, settings.workers + 1))  # + 1: DiLoCo's coordinator
        eval_tokens = prepare_data(root, settings)
        print_settings(settings, eval_tokens, root / "data", wan)
        results = []
        for variant in variants:
            print(f"running {variant} ...", flush=True)
            done = len(results)
            if variant == "ddp":
                for lr in ddp_lrs:
                    results.append(run_ddp(replace(settings, inner_lr=lr), root, network, eval_tokens, args.timeout))
                    print(f"  {results[-1].variant}: eval loss {results[-1].eval_loss:.4f}, "
                          f"{results[-1].wall_seconds:.1f} s", flush=True)
            else:
                results.append(run_diloco(settings, variant, root, network, eval_tokens, args.timeout))
                print(f"  {variant}: eval loss {results[-1].eval_loss:.4f}, {results[-1].wall_seconds:.1f} s", flush=True)
            # Each variant's figures as soon as it ends: a later variant's failure loses no earlier one.
            for result in results[done:]:
                print("  result: " + json.dumps(asdict(result)), flush=True)
    report(results, wan is not None)


if __name__ == "__main__":
    main()
