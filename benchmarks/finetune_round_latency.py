"""Seconds per federated fine-tuning round beyond the sites' own compute: Flower's stock runtime against Essaim's warm one.

A SecAgg+ round is four messages per site (setup, key shares, masked adapter,
unmask), of which one trains. The round's overhead is its wall time (server
sends instructions -> server aggregates) less the slowest site's fit (its time in
the training message: imports, loading, training).

- stock: Flower 1.41 as it ships: `flower-supernode` polling the SuperLink every
  3 s when idle, SuperExec polling for tasks every 1 s, a cold `flwr-clientapp`
  process per message (a training message imports torch, transformers, peft),
  and the ServerApp polling for replies every 3 s;
- warm: `essaim finetune site` as it runs by default (essaim.flower_warm: 0.1 s
  idle poll, 0.05 s task poll, app processes forked from a forkserver that
  imported the training stack at start) and the ServerApp polling every 0.1 s.

Both evaluate after the last round only. Sites and server share this machine's cores.

    .venv/bin/python benchmarks/finetune_round_latency.py [--rounds 3] [--sites 3] [--no-secagg]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coordinator.finetune_config import FinetuneSettings  # noqa: E402
from coordinator.finetune_lineage import RECORD_FILE, SETTINGS_FILE  # noqa: E402
from essaim.flower import APP_DIR, run_local_finetune  # noqa: E402
from model.instructions import PROMPT, write_pairs  # noqa: E402
from model.sample_instructions import DOMAINS, site_pairs, stand_in_checkpoint  # noqa: E402

def import_seconds(module: str, repeats: int = 3) -> float:
    """Median wall time of a fresh interpreter importing `module`: what a message's process pays for it."""
    times = []
    for _ in range(repeats):
        started = time.monotonic()
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
        times.append(time.monotonic() - started)
    return statistics.median(times)


def run_variant(settings: FinetuneSettings, workdir: Path, sites: list[str], stock: bool) -> dict:
    settings.save(settings.out / SETTINGS_FILE)
    started = time.monotonic()
    options = {site: ("--stock-flower",) if stock else () for site in sites}
    run_local_finetune(settings.out / SETTINGS_FILE, settings.checkpoint,
                       {site: workdir.parent / f"{site}.jsonl" for site in sites}, workdir, APP_DIR, options)
    seconds = time.monotonic() - started
    if not (settings.out / RECORD_FILE).exists():
        raise SystemExit(f"the run failed, see {workdir / 'finetune-run.log'}")
    rounds = json.loads((settings.out / RECORD_FILE).read_text())["rounds"]
    fit = [r["seconds"] for r in rounds]
    compute = [max(r["site_seconds"].values()) for r in rounds]
    overhead = [f - c for f, c in zip(fit, compute)]
    return {"total_s": round(seconds, 1), "round_s": fit, "slowest_site_s": compute, "overhead_s": overhead,
            "median_round_s": statistics.median(fit), "median_overhead_s": statistics.median(overhead)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sites", type=int, default=3, choices=[2, 3])
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--no-secagg", action="store_true")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="essaim-round-latency-"))
    sites = list(DOMAINS)[: args.sites]
    texts = []
    for index, site in enumerate(sites):
        pairs = site_pairs(site, 200, seed=index)
        write_pairs(workdir / f"{site}.jsonl", pairs)
        texts += [PROMPT.format(instruction=p.instruction) + p.answer for p in pairs]
    base = stand_in_checkpoint(workdir / "base", texts)

    light = import_seconds("worker.finetune_client")
    heavy = import_seconds("worker.finetune_site")
    print(f"a cold message process imports: ClientApp module {light:.2f} s; training stack {heavy:.2f} s")

    results = {}
    for name, stock in [("stock", True), ("warm", False)]:
        settings = FinetuneSettings(
            checkpoint=base, out=workdir / name / "out", rounds=args.rounds, min_sites=len(sites),
            local_steps=args.local_steps, secagg=not args.no_secagg, reply_poll_seconds=0.0 if stock else 0.1,
        )
        results[name] = run_variant(settings, workdir / name, sites, stock)

    print(f"\n{len(sites)} sites, SecAgg+ {'off' if args.no_secagg else 'on'}, {args.local_steps} local steps, "
          f"{args.rounds} rounds (seconds)")
    print(f"{'runtime':>8} {'round':>8} {'slowest site':>13} {'overhead':>9} {'whole run':>10}")
    for name, r in results.items():
        for index, (fit, site, over) in enumerate(zip(r["round_s"], r["slowest_site_s"], r["overhead_s"]), 1):
            print(f"{name + f' r{index}':>8} {fit:8.2f} {site:13.2f} {over:9.2f}"
                  + (f" {r['total_s']:10.1f}" if index == 1 else ""))
    stock, warm = results["stock"], results["warm"]
    print(f"median overhead per round: stock {stock['median_overhead_s']:.2f} s, warm {warm['median_overhead_s']:.2f} s")
    print(json.dumps({"sites": len(sites), "secagg": not args.no_secagg, "rounds": args.rounds,
                      "stock_round_s": stock["median_round_s"], "warm_round_s": warm["median_round_s"],
                      "stock_overhead_s": round(stock["median_overhead_s"], 2),
                      "warm_overhead_s": round(warm["median_overhead_s"], 2),
                      "stock_run_s": stock["total_s"], "warm_run_s": warm["total_s"]}))
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
