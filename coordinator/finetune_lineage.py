"""What a federated fine-tune leaves behind: the adapter, the merged model, and the record that joins the lineage.

OUT/adapter/        the LoRA adapter (peft format), loadable on the base checkpoint
OUT/merged/         the base with the adapter merged in: a plain Hugging Face model
                    with its tokenizer, finetune.json and its model card
OUT/finetune.json   the lineage record: base checkpoint (its digest, run and round),
                    the sites that took part in or refused each round, the privacy
                    settings and the guarantee (RDP and basic composition), each
                    site's privacy floor and the epsilon it spent, the adapter's hash.
                    Names and numbers only: no site's data goes into it.

The chain a reader follows: merged model -> finetune.json -> the base
checkpoint's checkpoint.json and model card -> the pretraining run's lineage.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerFast

from coordinator.card import card_markdown
from coordinator.finetune_config import FinetuneSettings
from coordinator.finetune_site_privacy import floor_text
from model.checkpoints import Checkpoint, load_model, read_checkpoint
from model.lora import ADAPTER_FILE, LoraSettings, adapter_parameters, arrays_digest, attach_lora, file_sha256, load_adapter_parameters

RECORD_FILE = "finetune.json"
SETTINGS_FILE = "finetune-settings.json"


def lora_settings(settings: FinetuneSettings) -> LoraSettings:
    return LoraSettings(rank=settings.lora_rank, alpha=settings.lora_alpha,
                        target_modules=tuple(settings.lora_targets.split(",")))


def base_adapter(settings: FinetuneSettings):  # type: ignore[no-untyped-def]
    """(the base checkpoint, the model with fresh adapters, the adapters as arrays) to start round 1 from."""
    base = read_checkpoint(settings.checkpoint)
    model = attach_lora(load_model(base), lora_settings(settings))
    return base, model, adapter_parameters(model)


def write_outputs(
    settings: FinetuneSettings, base: Checkpoint, model, final: list[np.ndarray],  # type: ignore[no-untyped-def]
    rounds: list[dict], evaluation: dict, site_privacy: dict, flower_run_id: int,
) -> Path:
    out = settings.out
    load_adapter_parameters(model, final)
    model.save_pretrained(out / "adapter")
    record = {
        "kind": "federated LoRA fine-tune",
        "flower_run_id": flower_run_id,
        "finished_at": time.time(),
        "base": {"path": str(base.path), "run_id": base.run_id, "completed_round": base.completed_round,
                 "params_digest": base.params_digest, "config_version": base.config_version},
        "sites": sorted({site for entry in rounds for site in entry["sites"]}),
        "rounds": rounds,
        "evaluation": evaluation,
        "training": {"rounds": settings.rounds, "local_steps": settings.local_steps, "batch_size": settings.batch_size,
                     "learning_rate": settings.learning_rate, "max_tokens": settings.max_tokens,
                     "lora": {"rank": settings.lora_rank, "alpha": settings.lora_alpha, "targets": settings.lora_targets}},
        "privacy": settings.privacy(),
        "site_privacy": site_privacy,  # per site: floor, rounds answered and refused, epsilon spent
        "adapter": {"file": f"adapter/{ADAPTER_FILE}", "sha256": file_sha256(out / "adapter" / ADAPTER_FILE),
                    "arrays_digest": arrays_digest(final), "parameters": int(sum(a.size for a in final))},
    }
    merged = out / "merged"
    model.merge_and_unload().save_pretrained(merged)
    PreTrainedTokenizerFast.from_pretrained(base.path).save_pretrained(merged)
    _write_json(merged / RECORD_FILE, record)
    write_tuned_card(record, base, merged)
    _write_json(out / RECORD_FILE, record)  # last: its presence says the run's outputs are complete
    return out


def write_tuned_card(record: dict, base: Checkpoint, directory: Path) -> None:
    """The tuned model's card: the fine-tune (from its record) on top of the base checkpoint's card, if it has one."""
    base_card_file = base.path / "model_card.json"
    base_card = json.loads(base_card_file.read_text()) if base_card_file.is_file() else None
    _write_json(directory / "model_card.json", {"finetune": record, "base_card": base_card})
    privacy = record["privacy"]
    secagg, dp = privacy["secure_aggregation"], privacy["differential_privacy"]
    lines = [
        f"# Model card: federated fine-tune of run {record['base']['run_id']}, round {record['base']['completed_round']}",
        "",
        f"- Base checkpoint: `{record['base']['path']}`, weights digest `{record['base']['params_digest']}`",
        f"- Adapter: LoRA rank {record['training']['lora']['rank']} on {record['training']['lora']['targets']}, "
        f"sha256 `{record['adapter']['sha256']}`",
        f"- Sites that took part: {', '.join(record['sites']) or 'none'}; their data never left them",
        f"- Rounds: {len(record['rounds'])}, {record['training']['local_steps']} local steps each",
        f"- Secure aggregation: {'SecAgg+, ' + str(secagg['num_shares']) + ' shares, threshold ' + str(secagg['reconstruction_threshold']) if secagg else 'off'}",  # noqa: E501
        f"- Differential privacy: {_dp_line(dp)}",
        *(f"- Site {name}: {_site_line(site)}" for name, site in record["site_privacy"].items()),
        "",
        "| round | sites | examples | failures |",
        "|---:|---|---:|---:|",
        *(f"| {r['round']} | {', '.join(r['sites'])} | {r['examples']:,} | {len(r['failures'])} |" for r in record["rounds"]),
        "",
    ]
    if record["evaluation"].get("held_out_loss") is not None:
        lines += [f"Held-out answer loss after round {record['evaluation']['round']}: "
                  f"{record['evaluation']['held_out_loss']:.4f} (each site on its own held-out pairs).", ""]
    lines += ["## Base model", ""]
    lines += [card_markdown(base_card)] if base_card else [
        f"The base checkpoint has no model card: run `essaim audit card {record['base']['path']} --data DIR`.", ""]
    (directory / "MODEL_CARD.md").write_text("\n".join(lines), encoding="utf-8")


def _dp_line(dp: dict | None) -> str:
    if not dp:
        return "off"
    basic = dp["basic_composition"]
    return (f"local, clip {dp['clipping_norm']}, noise std {dp['noise_stddev']:.4g} (multiplier "
            f"{dp['noise_multiplier']:.4g}); ({dp['epsilon_per_round']}, {dp['delta_per_round']})-DP per round; over the "
            f"run ({dp['epsilon_total']:.4g}, {dp['delta_total']:.2g})-DP by the RDP accountant "
            f"(basic composition: ({basic['epsilon_total']:.4g}, {basic['delta_total']:.2g})), per {dp['unit']}")


def _site_line(site: dict) -> str:
    spent = f", epsilon {site['epsilon_this_run']:.3g} spent in this run" if site["epsilon_this_run"] is not None else ""
    refused = f"; refused round(s) {', '.join(str(r['round']) for r in site['refused'])}" if site["refused"] else ""
    return (f"floor: {floor_text(site['floor'])}; answered round(s) {', '.join(map(str, site['rounds'])) or 'none'}"
            f"{spent}{refused}")


def read_record(out: Path) -> dict:
    return json.loads((Path(out) / RECORD_FILE).read_text())


def _write_json(path: Path, document: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
