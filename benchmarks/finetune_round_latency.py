"""Seconds per federated fine-tuning round, before and after the cuts, on a real deployment.

Flower starts a fresh ClientApp process for every message. A SecAgg+ round is
four messages per site (setup, key shares, masked adapter, unmask), of which
only one trains; federated evaluation adds a fifth.

- before: a ClientApp that imports torch, transformers and peft when it loads
  (what every message then pays), and sites evaluating after every round;
- after: Essaim's ClientApp (Flower alone at load; the training stack only in
  the messages that train or evaluate) and evaluation after the last round only.

It also times what one message's process pays for its imports.

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

EAGER_CLIENT = '''"""The ClientApp with its training stack imported at load, as a straightforward app would be."""
import peft  # noqa: F401
import torch  # noqa: F401
import transformers  # noqa: F401
import worker.finetune_site  # noqa: F401
from worker.finetune_client import app as essaim_app

app = essaim_app  # Flower looks for an assignment to `app` in this file
'''


def eager_app(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    text = (APP_DIR / "pyproject.toml").read_text().replace('"worker.finetune_client:app"', '"eager_client:app"')
    (directory / "pyproject.toml").write_text(text)
    (directory / "eager_client.py").write_text(EAGER_CLIENT)
    return directory


def import_seconds(module: str, repeats: int = 3) -> float:
    """Median wall time of a fresh interpreter importing `module`: what a message's process pays for it."""
    times = []
    for _ in range(repeats):
        started = time.monotonic()
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
        times.append(time.monotonic() - started)
    return statistics.median(times)


def run_variant(name: str, app_dir: Path, settings: FinetuneSettings, workdir: Path, sites: list[str]) -> dict:
    settings.save(settings.out / SETTINGS_FILE)
    started = time.monotonic()
    run_local_finetune(settings.out / SETTINGS_FILE, settings.checkpoint,
                       {site: workdir.parent / f"{site}.jsonl" for site in sites}, workdir, app_dir)
    seconds = time.monotonic() - started
    if not (settings.out / RECORD_FILE).exists():
        raise SystemExit(f"{name}: the run failed, see {workdir / 'finetune-run.log'}")
    record = json.loads((settings.out / RECORD_FILE).read_text())
    fit = [r["seconds"] for r in record["rounds"]]
    return {"total": seconds, "fit_rounds": fit, "per_round": seconds / settings.rounds}


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
    print(f"a message's process imports: ClientApp module {light:.2f} s; training stack {heavy:.2f} s")

    results = {}
    for name, app_dir, evaluate_every in [("before", eager_app(workdir / "eager-app"), 1), ("after", APP_DIR, 0)]:
        settings = FinetuneSettings(
            checkpoint=base, out=workdir / name / "out", rounds=args.rounds, min_sites=len(sites),
            local_steps=args.local_steps, secagg=not args.no_secagg, evaluate_every=evaluate_every,
        )
        results[name] = run_variant(name, app_dir, settings, workdir / name, sites)
        r = results[name]
        print(f"{name:>6}: {r['total']:.1f} s for {args.rounds} rounds = {r['per_round']:.1f} s/round "
              f"(fit phases {', '.join(f'{s:.1f}' for s in r['fit_rounds'])} s)")
    cut = 1 - results["after"]["per_round"] / results["before"]["per_round"]
    print(f"\n{len(sites)} sites, SecAgg+ {'off' if args.no_secagg else 'on'}, {args.local_steps} local steps: "
          f"{results['before']['per_round']:.1f} -> {results['after']['per_round']:.1f} s per round ({cut:.0%} less)")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
