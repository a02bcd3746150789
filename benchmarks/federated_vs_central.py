"""Federated LoRA against centralized LoRA on the union of the data, and against each site alone.

Three sites hold different private data (an energy utility, a hospital, a bank:
non-IID by construction). Every variant starts from the same base checkpoint and
adapter and is scored the same way: answer loss on each site's held-out pairs,
averaged over the sites.

- federated: a real deployment (SuperLink + one SuperNode per site, SecAgg+),
  R rounds of K local steps per site;
- centralized: one AdamW run on the union for the same total steps (R x K x sites);
- each site alone: R x K steps on its own data, what its own compute buys it.

    .venv/bin/python benchmarks/federated_vs_central.py [--rounds 5] [--local-steps 20] [--checkpoint DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coordinator.finetune_config import FinetuneSettings  # noqa: E402
from coordinator.finetune_lineage import RECORD_FILE, SETTINGS_FILE, lora_settings  # noqa: E402
from essaim.flower import run_local_finetune  # noqa: E402
from model.checkpoints import load_model, read_checkpoint  # noqa: E402
from model.instructions import PROMPT, read_pairs, split_pairs, tokenize_pairs, write_pairs  # noqa: E402
from model.lora import answer_loss, attach_lora, load_adapter_arrays, train_adapter  # noqa: E402
from model.sample_instructions import DOMAINS, site_pairs, stand_in_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=400, help="pairs per site (a tenth held out)")
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    parser.add_argument("--checkpoint", type=Path, help="base checkpoint (default: a stand-in tiny model)")
    parser.add_argument("--no-secagg", action="store_true")
    parser.add_argument("--workdir", type=Path, help="keep files here (default: a temporary directory)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="essaim-fed-vs-central-"))
    workdir.mkdir(parents=True, exist_ok=True)

    data = {}
    for index, domain in enumerate(DOMAINS):
        write_pairs(workdir / f"{domain}.jsonl", site_pairs(domain, args.pairs, seed=index))
        data[domain] = split_pairs(read_pairs(workdir / f"{domain}.jsonl"))  # the sites hold out the same pairs
    base_dir = args.checkpoint or stand_in_checkpoint(
        workdir / "base", [PROMPT.format(instruction=p.instruction) + p.answer for train, _ in data.values() for p in train])
    settings = FinetuneSettings(
        checkpoint=base_dir.resolve(), out=(workdir / "federated").resolve(), rounds=args.rounds,
        min_sites=len(DOMAINS), local_steps=args.local_steps, learning_rate=args.learning_rate,
        secagg=not args.no_secagg,
    )
    base = read_checkpoint(base_dir)
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(base_dir)
    held_out = {d: tokenize_pairs(h, tokenizer, settings.max_tokens) for d, (_, h) in data.items()}

    def fresh():  # type: ignore[no-untyped-def]
        return attach_lora(load_model(base), lora_settings(settings))

    def score(model) -> dict[str, float]:  # type: ignore[no-untyped-def]
        losses = {d: answer_loss(model, examples) for d, examples in held_out.items()}
        return {**losses, "mean": sum(losses.values()) / len(losses)}

    results: dict[str, dict] = {"base": score(fresh())}
    steps = args.rounds * args.local_steps
    union = [p for train, _ in data.values() for p in train]
    started = time.monotonic()
    model = fresh()
    train_adapter(model, tokenize_pairs(union, tokenizer, settings.max_tokens), steps * len(DOMAINS),
                  settings.batch_size, settings.learning_rate, seed=0)
    results["centralized"] = {**score(model), "seconds": time.monotonic() - started}
    for domain, (train, _) in data.items():
        model = fresh()
        train_adapter(model, tokenize_pairs(train, tokenizer, settings.max_tokens), steps, settings.batch_size,
                      settings.learning_rate, seed=0)
        results[f"{domain} alone"] = score(model)

    results["federated"] = federated(settings, workdir, data, fresh, score)
    report(results, args, settings)
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nfiles: {workdir}")


def federated(settings: FinetuneSettings, workdir: Path, data: dict, fresh, score) -> dict:  # type: ignore[no-untyped-def]
    settings.save(settings.out / SETTINGS_FILE)
    started = time.monotonic()
    code = run_local_finetune(settings.out / SETTINGS_FILE, settings.checkpoint,
                              {domain: workdir / f"{domain}.jsonl" for domain in data}, workdir)
    seconds = time.monotonic() - started
    if not (settings.out / RECORD_FILE).exists():
        raise SystemExit(f"the federated run failed (flwr run exit {code}): see {workdir / 'finetune-run.log'}")
    record = json.loads((settings.out / RECORD_FILE).read_text())
    from safetensors.numpy import load_file

    model = fresh()
    adapter = load_file(settings.out / "adapter" / "adapter_model.safetensors")
    load_adapter_arrays(model, [adapter[name] for name in sorted(adapter)])
    return {**score(model), "seconds": seconds, "round_seconds": [r["seconds"] for r in record["rounds"]]}


def report(results: dict, args: argparse.Namespace, settings: FinetuneSettings) -> None:
    domains = list(DOMAINS)
    print(f"\n{args.rounds} rounds x {args.local_steps} local steps, batch {settings.batch_size}, "
          f"lr {settings.learning_rate}, LoRA rank {settings.lora_rank}, SecAgg+ {'on' if settings.secagg else 'off'}")
    print(f"{'variant':<18}" + "".join(f"{d:>10}" for d in domains) + f"{'mean':>10}")
    for name, scores in results.items():
        print(f"{name:<18}" + "".join(f"{scores[d]:>10.4f}" for d in domains) + f"{scores['mean']:>10.4f}")
    central, fed = results["centralized"]["mean"], results["federated"]["mean"]
    print(f"\nfederated vs centralized: {100 * (fed - central) / central:+.2f} % held-out loss "
          f"(goal: within 5 %); federated run {results['federated']['seconds']:.0f} s, "
          f"rounds {', '.join(f'{s:.0f}' for s in results['federated']['round_seconds'])} s")


if __name__ == "__main__":
    main()
