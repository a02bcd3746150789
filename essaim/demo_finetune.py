"""The demo's second act: three companies fine-tune the community checkpoint together, their data staying home.

A SuperLink and one SuperNode per site (an energy utility, a hospital, a bank,
each with its own made-up customer questions) on 127.0.0.1, a SecAgg+ LoRA
fine-tune of the checkpoint the first act trained, then what the lineage
record says. The hospital sets its own floor (--require-secagg), which the run
meets. Every Flower process is stopped by process group.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from coordinator.finetune_config import FinetuneSettings
from coordinator.finetune_lineage import RECORD_FILE, SETTINGS_FILE, read_record
from coordinator.finetune_site_privacy import floor_text
from essaim.flower import run_local_finetune
from model.instructions import write_pairs
from model.sample_instructions import DOMAINS, site_pairs

SITE_NAMES = {"energy": "energy-utility", "hospital": "hospital", "bank": "bank"}
FLOORS = {"hospital": ("--require-secagg",)}  # the hospital takes part only in securely aggregated rounds


def run_finetune_demo(console: Console, checkpoint: Path, workdir: Path, rounds: int) -> int:
    workdir.mkdir(parents=True, exist_ok=True)
    logs = workdir / "logs"
    settings = FinetuneSettings(
        checkpoint=checkpoint, out=workdir / "tuned", rounds=rounds, min_sites=len(DOMAINS),
        local_steps=20, learning_rate=5e-3,
    )
    sites = {}
    for index, domain in enumerate(DOMAINS):
        sites[SITE_NAMES[domain]] = workdir / "private" / f"{domain}.jsonl"
        write_pairs(sites[SITE_NAMES[domain]], site_pairs(domain, 200, seed=index))
    settings.save(settings.out / SETTINGS_FILE)
    with console.status(f"Federated fine-tune: {len(DOMAINS)} sites, {rounds} SecAgg+ rounds of LoRA "
                        "(Flower starts a process per message: about a minute a round)..."):
        run_local_finetune(settings.out / SETTINGS_FILE, checkpoint, sites, logs, site_options=FLOORS)
    if not (settings.out / RECORD_FILE).exists():
        console.print(f"[red]the fine-tune failed: see {logs}")
        return 1
    _print_record(console, read_record(settings.out), settings.out)
    return 0


def _print_record(console: Console, record: dict, out: Path) -> None:
    from transformers import AutoModelForCausalLM

    table = Table("round", "sites", "training loss by site", "seconds", title="Federated fine-tune (LoRA, SecAgg+)")
    for entry in record["rounds"]:
        losses = ", ".join(f"{site} {loss:.3f}" for site, loss in sorted(entry["train_loss"].items()))
        table.add_row(str(entry["round"]), str(len(entry["sites"])), losses, f"{entry['seconds']:.0f}")
    console.print(table)
    evaluation = record["evaluation"]
    if evaluation.get("by_site"):
        console.print("held-out answer loss after the last round: " + ", ".join(
            f"{site} {result['loss']:.3f}" for site, result in sorted(evaluation["by_site"].items())))
    for site, privacy in record["site_privacy"].items():
        refused = f", refused rounds {[r['round'] for r in privacy['refused']]}" if privacy["refused"] else ""
        console.print(f"site {site}: privacy floor: {floor_text(privacy['floor'])}{refused}")
    AutoModelForCausalLM.from_pretrained(out / "merged")  # proves the merged model loads as a plain model
    console.print(
        f"only adapters left the sites ({record['adapter']['parameters']:,} parameters a round), summed under SecAgg+; "
        f"adapter sha256 {record['adapter']['sha256'][:16]}…\n"
        f"merged model and its card (base checkpoint, sites, privacy): {out / 'merged'}"
    )
