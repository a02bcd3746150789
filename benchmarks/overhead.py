"""Tokens/s of the worker's training loop (inner steps and outer steps) against a plain PyTorch loop.

Both sides train the same preset from the same seed on the same token batches, on
the same device and precision, in one process, interleaved repeat by repeat.
- plain: what one writes by hand: the model and a fused AdamW on the device, bf16
  autocast where asked, batches already in (pinned) memory, the loss never read.
- worker: what `essaim worker join` runs: leases read from a shard with its sha256
  check, `worker.data.batches`, `DiLoCoTrainer.inner_step` (worker/step.py), the loss
  summed on the device and read once per round, then the real outer step
  (`DiLoCoTrainer.outer_step`: device-to-host copy, pseudo-gradient, compressed
  all-reduce with a second hivemind peer, Nesterov step on the host, host-to-device),
  all amortised over `--inner-steps` steps a round. hivemind runs throughout.
The partner peer is a bare averager in this process's machine: its share of the
all-reduce costs this machine's cores too, as a peer elsewhere would not.

Usage: python benchmarks/overhead.py [--device cpu|cuda] [--preset tiny] [--precision auto]
       [--compile] [--inner-steps 100] [--rounds 2] [--batch-size 8] [--seq-len 128] [--repeats 3]
Prints every repeat's tokens/s, the best and the median, the ratio of medians, MFU and
peak memory on CUDA, and the outer step's parts; then `ratio R` and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from hivemind.compression import CompressionInfo

from model.presets import build_model, llama_config, parameter_count
from model.shards import token_dtype, write_shard
from protocol import essaim_pb2 as pb
from protocol.swarm import Swarm
from worker.round_progress import RoundProgress
from worker.allreduce import COMPRESSIONS
from worker.capabilities import calibrate
from worker.data import batches
from worker.device import DevicePlan, plan_device
from worker.diloco import AveragingCancelled, DiLoCoSettings, DiLoCoTrainer
from worker.shards import ShardStore

logging.getLogger("hivemind").setLevel(logging.CRITICAL)  # a partner looking for a group logs every miss
logging.getLogger("essaim").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="torch.quantize_per_tensor")  # hivemind's 8-bit quantizer, every call

# Dense bf16 / tf32 peak FLOP/s of the GPUs MFU is computed for (vendor datasheets, no sparsity).
PEAK_FLOPS = {"H200": (989e12, 494e12), "H100": (989e12, 494e12), "A100": (312e12, 156e12),
              "L40S": (362e12, 183e12), "V100": (125e12, 15.7e12)}
OUTER_PARTS = ("device_to_host", "pseudo_gradient", "average", "outer_step", "host_to_device")


class Partner:
    """A second peer that averages with the worker each round, as a peer on another machine would.

    It is a DiLoCoTrainer on the CPU that takes no inner steps (hivemind names its RPCs
    after the averager's class, so only a trainer's averager can match a trainer's). It
    looks for a group only when told the worker's round ends: a peer elsewhere would not
    spend this machine's cores on matchmaking during the inner steps.
    """

    def __init__(self, preset: str, vocab: int, swarm: Swarm, settings: DiLoCoSettings) -> None:
        self.trainer = DiLoCoTrainer(build_model(preset, vocab, 0), settings, swarm.dht, plan_device("cpu", "fp32"))
        self.trainer.expect_peers(2)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def average_round(self, number: int) -> None:
        """Join round `number`'s all-reduce in the background (until it happens, or close())."""
        self.trainer.round = number
        self._thread = threading.Thread(target=self._average, daemon=True)
        self._thread.start()

    def _average(self) -> None:
        try:
            while self.trainer.outer_step(1, cancel=self._stop, apply_alone=lambda: False) is None:
                pass  # no group formed: look again
        except AveragingCancelled:
            pass

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.trainer.shutdown()


def write_token_shard(directory: Path, vocab: int, tokens: int) -> pb.Lease:
    """A shard of uniform random token ids (the benchmark measures speed, not learning), as a lease of all of it."""
    dtype = token_dtype(vocab)
    values = np.random.default_rng(0).integers(0, vocab, tokens)
    sha256 = write_shard(values, directory / "bench.bin", dtype)
    return pb.Lease(shard_file="bench.bin", shard_sha256=sha256, shard_tokens=tokens, dtype=dtype, start=0, end=tokens)


def leases_by_round(shard: pb.Lease, rounds: int, round_tokens: int, per_round: int = 4) -> list[list[pb.Lease]]:
    """Each round's leases, `per_round` of them, as the coordinator cuts them (leases_per_round)."""
    size = round_tokens // per_round

    def lease(start: int) -> pb.Lease:
        piece = pb.Lease()
        piece.CopyFrom(shard)
        piece.start, piece.end = start, min(start + size, shard.end)
        return piece

    return [[lease(start) for start in range(r * round_tokens, (r + 1) * round_tokens, size)] for r in range(rounds)]


def plain_loop(preset: str, vocab: int, plan: DevicePlan, rows: list[torch.Tensor], lr: float, compile: bool,
               warmup: int) -> float:
    model = build_model(preset, vocab, 0).to(plan.device)
    forward = torch.compile(model) if compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=plan.is_cuda or None)
    model.train()

    def step(batch: torch.Tensor) -> None:
        batch = batch.to(plan.device, non_blocking=True)
        with plan.autocast():
            loss = forward(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for batch in rows[:warmup]:
        step(batch)
    plan.synchronize()
    started = time.perf_counter()
    for batch in rows:
        step(batch)
    plan.synchronize()
    return sum(b.numel() for b in rows) / (time.perf_counter() - started)


def worker_loop(preset: str, vocab: int, plan: DevicePlan, settings: DiLoCoSettings, swarm: Swarm, partner: Partner,
                data: Path, leases: list[list[pb.Lease]], args: argparse.Namespace) -> tuple[float, list[dict]]:
    trainer = DiLoCoTrainer(build_model(preset, vocab, 0), settings, swarm.dht, plan)
    try:
        # As the agent does at join: calibration (the warm-up: kernels, allocations, compilation), then back.
        calibrate(trainer.forward_model, plan, vocab, args.batch_size, args.seq_len, settings.inner_lr)
        trainer.discard_local_progress()
        trainer.expect_peers(2)
        reader = ShardStore(data)  # a fresh reader checks the shard's sha256, as a new worker does
        outer_parts, tokens = [], 0
        plan.synchronize()
        started = time.perf_counter()
        for round_leases in leases:
            progress = RoundProgress()
            for lease in round_leases:
                for batch in batches(reader.tokens(lease), args.batch_size, args.seq_len):
                    progress.add_loss(trainer.inner_step(batch))
                    progress.tokens += batch.numel()
            progress.mean_loss()  # the round's one read of the device
            partner.average_round(trainer.round)
            result = trainer.outer_step(progress.tokens, cancel=threading.Event())
            assert result is not None and result.group_size == 2, "the partner peer did not average"
            outer_parts.append(dict(vars(trainer.outer.timings)))
            tokens += progress.tokens
        plan.synchronize()
        rate = tokens / (time.perf_counter() - started)
        return rate, outer_parts
    finally:
        trainer.shutdown()


def compression_seconds(name: str, like: list[torch.Tensor]) -> float:
    """Compressing a whole pseudo-gradient once on the host, as the all-reduce does per part."""
    compression = COMPRESSIONS[name]()
    tensors = [torch.randn_like(t) for t in like]
    started = time.perf_counter()
    for tensor in tensors:
        compression.compress(tensor, CompressionInfo.from_tensor(tensor))
    return time.perf_counter() - started


def model_flops_per_token(preset: str, vocab: int, seq_len: int) -> float:
    """6N for the weights' matmuls forward and backward, plus attention's 12 L h T (PaLM's appendix B)."""
    config = llama_config(preset, vocab)
    return 6 * parameter_count(preset, vocab) + 12 * config.num_hidden_layers * config.hidden_size * seq_len


def peak_flops(plan: DevicePlan) -> float | None:
    for name, (bf16, tf32) in PEAK_FLOPS.items():
        if name in plan.name:
            return bf16 if plan.precision == "bf16" else tf32
    return None


def summary(rates: list[float]) -> str:
    runs = ", ".join(f"{r:,.0f}" for r in rates)
    return f"{statistics.median(rates):>12,.0f} {max(rates):>12,.0f}   runs: {runs}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--inner-steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--compression", default="8bit", choices=sorted(COMPRESSIONS))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    plan = plan_device(args.device, args.precision)
    lr, tokens_per_step = 1e-3, args.batch_size * args.seq_len
    settings = DiLoCoSettings(inner_lr=lr, outer_lr=0.7, outer_momentum=0.9, dht_prefix="bench", target_group_size=2,
                              matchmaking_seconds=1.0, averaging_timeout_seconds=120.0, compression=args.compression,
                              compile=args.compile)
    with tempfile.TemporaryDirectory(prefix="essaim-bench-") as tmp:
        data = Path(tmp)
        round_tokens = args.inner_steps * tokens_per_step
        shard = write_token_shard(data, args.vocab, args.rounds * round_tokens)
        leases = leases_by_round(shard, args.rounds, round_tokens)
        all_tokens = ShardStore(data).tokens(shard)
        rows = [b.pin_memory() if plan.is_cuda else b for b in batches(all_tokens, args.batch_size, args.seq_len)]

        swarm = Swarm("127.0.0.1")
        partner_swarm = Swarm("127.0.0.1", initial_peers=swarm.visible_addresses())
        partner = Partner(args.preset, args.vocab, partner_swarm, settings)
        like = partner.trainer.global_params
        plain_rates, worker_rates, peaks, outer = [], [], {"plain": 0, "worker": 0}, []
        try:
            for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
                if plan.is_cuda:
                    torch.cuda.reset_peak_memory_stats(plan.device)
                plain_rates.append(plain_loop(args.preset, args.vocab, plan, rows, lr, args.compile, warmup=2))
                if plan.is_cuda:
                    peaks["plain"] = max(peaks["plain"], torch.cuda.max_memory_allocated(plan.device))
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(plan.device)
                rate, parts = worker_loop(args.preset, args.vocab, plan, settings, swarm, partner, data, leases, args)
                worker_rates.append(rate)
                outer += parts
                if plan.is_cuda:
                    peaks["worker"] = max(peaks["worker"], torch.cuda.max_memory_allocated(plan.device))
                    torch.cuda.empty_cache()
        finally:
            partner.close()
            partner_swarm.close()
            swarm.close()
        compress = compression_seconds(args.compression, like)

    ratio = statistics.median(worker_rates) / statistics.median(plain_rates)
    print(f"preset {args.preset} ({parameter_count(args.preset, args.vocab) / 1e6:,.1f} M parameters, vocabulary "
          f"{args.vocab}) on {plan.describe()} in {plan.precision}{' compiled' if args.compile else ''}; "
          f"{args.rounds} round(s) of {args.inner_steps} steps of {args.batch_size}x{args.seq_len} tokens; "
          f"{torch.get_num_threads()} torch threads; {args.repeats} repeats, interleaved")
    print(f"{'tokens/s':<18} {'median':>12} {'best':>12}")
    print(f"{'plain loop':<18} {summary(plain_rates)}")
    print(f"{'worker (DiLoCo)':<18} {summary(worker_rates)}")
    print(f"ratio of medians worker/plain: {ratio:.3f}  (best-of ratio {max(worker_rates) / max(plain_rates):.3f})")
    figures: dict[str, object] = {"preset": args.preset, "device": str(plan.device), "precision": plan.precision,
                                  "compile": args.compile, "inner_steps": args.inner_steps,
                                  "plain_tokens_per_s": statistics.median(plain_rates),
                                  "worker_tokens_per_s": statistics.median(worker_rates), "ratio": round(ratio, 4)}
    peak = peak_flops(plan)
    if plan.is_cuda:
        flops = model_flops_per_token(args.preset, args.vocab, args.seq_len)
        for side, rates in (("plain", plain_rates), ("worker", worker_rates)):
            mfu = f"MFU {flops * statistics.median(rates) / peak:.3f}" if peak else "MFU n/a (unknown GPU peak)"
            print(f"{side:<7} {mfu}, peak device memory {peaks[side] / 2**30:.1f} GiB")
        figures["mfu_worker"] = round(flops * statistics.median(worker_rates) / peak, 4) if peak else None
        figures["peak_gib_worker"] = round(peaks["worker"] / 2**30, 2)
    median_parts = {part: statistics.median(p[part] for p in outer) for part in OUTER_PARTS}
    round_seconds = args.inner_steps * tokens_per_step / statistics.median(worker_rates)
    print("outer step, median seconds per round: " + ", ".join(f"{k} {v:.3f}" for k, v in median_parts.items())
          + f"; {args.compression} compression of the whole pseudo-gradient measured apart: {compress:.3f}")
    print(f"outer step total {sum(median_parts.values()):.3f} s of a {round_seconds:.1f} s round "
          f"({100 * sum(median_parts.values()) / round_seconds:.1f} %)")
    figures["outer_seconds"] = {k: round(v, 4) for k, v in median_parts.items()}
    print(f"ratio {ratio:.3f}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
