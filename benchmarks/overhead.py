"""Tokens/s of the worker's inner training loop against a plain PyTorch AdamW loop.

Same model (preset, seed), same token batches, one process. The worker side runs
as in `essaim worker join`: shard read with its sha256 check, `worker.data.batches`,
`DiLoCoTrainer.inner_step`, with its hivemind DHT and averager alive in the
background. Usage: python benchmarks/overhead.py [--preset tiny] [--steps 200]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from model.corpus import prepare_corpus
from model.corpus_config import load_corpus_config
from model.presets import build_model
from model.sample_corpus import write_sample_corpus
from protocol import essaim_pb2 as pb
from protocol.swarm import Swarm
from worker.data import ShardReader, batches
from worker.diloco import DiLoCoSettings, DiLoCoTrainer


def plain_loop(model: torch.nn.Module, rows: list[torch.Tensor], lr: float) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    started = time.perf_counter()
    for batch in rows:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return sum(b.numel() for b in rows) / (time.perf_counter() - started)


def worker_loop(trainer: DiLoCoTrainer, reader: ShardReader, leases: list[pb.Lease], batch: int, seq: int) -> float:
    started, tokens = time.perf_counter(), 0
    for lease in leases:
        for rows in batches(reader.tokens(lease), batch, seq):
            trainer.inner_step(rows)
            tokens += rows.numel()
    return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    lr, vocab = 1e-3, 4096

    with tempfile.TemporaryDirectory(prefix="essaim-bench-") as tmp:
        root = Path(tmp)
        config = write_sample_corpus(root / "text", chars_per_language=1_000_000)
        manifest, _ = prepare_corpus(load_corpus_config(config), root / "data", vocab_size=vocab, shard_tokens=1 << 20)
        tokens_per_step = args.batch_size * args.seq_len
        shard = max(manifest.shards, key=lambda s: s.tokens)
        steps = min(args.steps, shard.tokens // tokens_per_step)
        # Leases of 20 steps each, as the coordinator would cut them.
        lease_tokens = 20 * tokens_per_step
        leases = [
            pb.Lease(shard_file=shard.file, shard_sha256=shard.sha256, shard_tokens=shard.tokens,
                     dtype=shard.dtype, start=start, end=min(start + lease_tokens, steps * tokens_per_step))
            for start in range(0, steps * tokens_per_step, lease_tokens)
        ]
        reader = ShardReader(root / "data")
        all_tokens = torch.cat([reader.tokens(lease) for lease in leases])
        rows = list(batches(all_tokens, args.batch_size, args.seq_len))

        swarm = Swarm("127.0.0.1")
        settings = DiLoCoSettings(inner_lr=lr, outer_lr=0.7, outer_momentum=0.9, dht_prefix="bench",
                                  target_group_size=2, matchmaking_seconds=3.0, averaging_timeout_seconds=10.0)
        plain_rates, worker_rates = [], []
        try:
            for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
                plain_rates.append(plain_loop(build_model(args.preset, vocab, 0), rows, lr))
                trainer = DiLoCoTrainer(build_model(args.preset, vocab, 0), settings, swarm.dht)
                reader = ShardReader(root / "data")  # a fresh reader re-checks the sha256, as a new worker does
                worker_rates.append(worker_loop(trainer, reader, leases, args.batch_size, args.seq_len))
                trainer.shutdown()
        finally:
            swarm.close()

    plain, worker = max(plain_rates), max(worker_rates)
    print(f"preset {args.preset}, {steps} steps of {args.batch_size}x{args.seq_len} tokens, "
          f"{torch.get_num_threads()} torch threads, best of {args.repeats}")
    print(f"plain AdamW loop : {plain:10,.0f} tokens/s   (runs: {', '.join(f'{r:,.0f}' for r in plain_rates)})")
    print(f"worker inner loop: {worker:10,.0f} tokens/s   (runs: {', '.join(f'{r:,.0f}' for r in worker_rates)})")
    print(f"ratio worker/plain: {worker / plain:.3f}")


if __name__ == "__main__":
    main()
