"""`essaim audit summary`: the public summary of training content (EU AI Office template), from the lineage."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from coordinator.store import LineageRecord, Shard, Worker, sqlite_url
from essaim.cli import app
from model.corpus import REPORT_FILE
from run_records import record_run, write_checkpoint_json
from support import one_shard_store

HEADINGS = [
    "## 1. General information", "### 1.1 Provider identification", "### 1.2 Model identification",
    "### 1.3 Modalities, overall training data size and other characteristics", "## 2. List of data sources",
    "### 2.1 Publicly available datasets", "### 2.2.1 Private datasets commercially licensed",
    "### 2.2.2 Private datasets obtained from other third parties", "### 2.3 Data crawled and scraped from online sources",
    "### 2.4 User data", "### 2.5 Synthetic data", "### 2.6 Other sources of data",
    "### Sources whose kind is not stated", "### Licences", "## 3. Data processing aspects",
    "### 3.1 Respect of reservation of rights from the text and data mining exception or limitation",
    "### 3.2 Removal of illegal content", "### 3.3 Other information: filtering and deduplication",
    "## Additional information: energy",
]


def summary(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, ["audit", "summary", *args])


def lineage_up_to(sessions, completed_round: int) -> dict:  # type: ignore[no-untyped-def]
    """What the lineage says the checkpoint of that round trained: tokens per source, language, licence; dates; energy."""
    figures: dict = {"source": defaultdict(int), "language": defaultdict(int), "licence": defaultdict(int),
                     "dates": [], "joules": 0.0, "gram_joules": 0.0}
    with sessions() as session:
        for record, shard, grid in session.execute(
            select(LineageRecord, Shard, Worker.grid_gco2_per_kwh).join(Shard, Shard.id == LineageRecord.shard_id)
            .join(Worker, Worker.id == LineageRecord.worker_id).where(LineageRecord.round <= completed_round)
        ):
            tokens = record.end - record.start
            figures["source"][shard.source] += tokens
            figures["language"][shard.language] += tokens
            figures["licence"][shard.licence] += tokens
            figures["dates"] += [shard.date_from, shard.date_to]
            figures["joules"] += record.energy_joules
            figures["gram_joules"] += record.energy_joules * grid
    return figures


def test_the_summary_states_the_checkpoints_tokens_by_kind_language_licence_and_dates_as_the_lineage_has_them(
    tmp_path: Path, corpus_dir: Path
) -> None:
    database = sqlite_url(tmp_path / "run.db")
    sessions = record_run(database, corpus_dir, rounds=3)
    checkpoint = write_checkpoint_json(tmp_path / "round-000001", corpus_dir, completed_round=1, saved_at=time.time())
    expected = lineage_up_to(sessions, 1)
    total = sum(expected["source"].values())
    public, *others = sorted(expected["source"])
    assert others, "the run should train more than one source by round 1"

    result = summary(str(checkpoint), "--data", str(corpus_dir), "--database", database,
                     "--source-kind", f"{public}=public", "--provider", "OpenLLM-France, contact@example.org")
    assert result.exit_code == 0, result.output
    document = json.loads((checkpoint / "TRAINING_SUMMARY.json").read_text())
    general = document["general"]
    assert general["training_data_size"]["text"] == {"tokens": total, "range": "less than 1 billion tokens"}
    assert total < sum(lineage_up_to(sessions, 2)["source"].values())  # round 2 is not in this checkpoint
    assert {k: v["tokens"] for k, v in general["languages"].items()} == expected["language"]
    assert {k: v["tokens"] for k, v in general["licences"].items()} == expected["licence"]
    assert sum(v["share"] for v in general["languages"].values()) == pytest.approx(1.0)
    assert general["dates"] == {"from": min(expected["dates"]), "to": max(expected["dates"])}
    assert general["provider"] == "OpenLLM-France, contact@example.org"

    # Each source under the kind stated for it, or "not stated"; the kinds' shares cover every token once.
    sections = document["sources"]
    assert sum(s["share"] for s in sections.values()) == pytest.approx(1.0)
    assert [s["name"] for s in sections["public"]["sources"]] == [public]
    assert sections["public"]["tokens"] == expected["source"][public]
    assert sorted(s["name"] for s in sections["not_stated"]["sources"]) == others
    assert not any(sections[kind]["used"] for kind in ("licensed", "private", "crawled", "user", "synthetic", "other"))

    # Processing: the preparation report's figures for the trained sources; no opt-out list, said so.
    report = json.loads((corpus_dir / REPORT_FILE).read_text())["sources"]
    preparation = document["processing"]["preparation_report"]
    assert set(preparation["per_source"]) == set(expected["source"])
    assert preparation["records"] == sum(report[name]["records"] for name in expected["source"])
    for reason in ("exact_duplicate", "near_duplicate"):
        assert preparation["deduplication"][reason] == sum(
            report[name]["removed"].get(reason, {}).get("documents", 0) for name in expected["source"])
    assert document["processing"]["tdm_reservations"] == {"list_configured": False}

    # Energy: the lineage's joules in kWh, and CO2e where a worker declared its grid.
    energy = document["energy"]
    assert energy["kwh"] == pytest.approx(expected["joules"] / 3.6e6) and energy["kwh"] > 0
    assert energy["emissions_kg_co2e"] == pytest.approx(expected["gram_joules"] / 3.6e6 / 1000)

    markdown = (checkpoint / "TRAINING_SUMMARY.md").read_text()
    positions = [markdown.index(heading) for heading in HEADINGS]
    assert positions == sorted(positions)
    assert f"- Training data size: {total:,} tokens" in markdown
    assert "No text-and-data-mining reservation (opt-out) list was configured for this corpus" in markdown
    assert f"| {public} |" in markdown.split("### 2.1")[1].split("### 2.2.1")[0]
    assert "OpenLLM-France, contact@example.org" in markdown


def test_an_existing_summary_a_directory_that_is_no_checkpoint_and_another_runs_database_are_refused(
    tmp_path: Path, corpus_dir: Path
) -> None:
    database = sqlite_url(tmp_path / "run.db")
    record_run(database, corpus_dir, rounds=1)
    checkpoint = write_checkpoint_json(tmp_path / "round-000000", corpus_dir, completed_round=0, saved_at=time.time())
    args = ("--data", str(corpus_dir), "--database", database)
    assert summary(str(checkpoint), *args).exit_code == 0
    first = (checkpoint / "TRAINING_SUMMARY.json").read_text()

    again = summary(str(checkpoint), *args)
    assert again.exit_code == 2 and "already exist: give --force" in again.output
    assert (checkpoint / "TRAINING_SUMMARY.json").read_text() == first
    forced = summary(str(checkpoint), *args, "--force")
    assert forced.exit_code == 0 and (checkpoint / "TRAINING_SUMMARY.json").read_text() != first  # a new generated_at

    (tmp_path / "not-a-checkpoint").mkdir()
    refused = summary(str(tmp_path / "not-a-checkpoint"), *args)
    assert refused.exit_code == 2 and "is neither a checkpoint" in refused.output
    assert list((tmp_path / "not-a-checkpoint").iterdir()) == []

    other = sqlite_url(tmp_path / "other.db")
    one_shard_store(other)
    fresh = write_checkpoint_json(tmp_path / "fresh", corpus_dir, completed_round=0, saved_at=time.time())
    wrong = summary(str(fresh), "--data", str(corpus_dir), "--database", other)
    assert wrong.exit_code == 2 and "is not the one in --data" in wrong.output
    unknown = summary(str(fresh), *args, "--source-kind", "nosuch=public")
    assert unknown.exit_code == 2 and "'nosuch' is not a source of this corpus" in unknown.output
    scraped = summary(str(fresh), *args, "--source-kind", "cpython-stdlib=scraped")
    assert scraped.exit_code == 2 and "KIND one of public, licensed, private, crawled" in scraped.output
    assert [path.name for path in fresh.iterdir()] == ["checkpoint.json"]  # nothing half-written


def test_a_fine_tunes_summary_names_its_sites_private_data_without_more_and_embeds_its_base_models(
    tmp_path: Path, corpus_dir: Path
) -> None:
    from coordinator.finetune_config import FinetuneSettings
    from coordinator.finetune_lineage import lora_settings, write_outputs
    from model.checkpoints import read_checkpoint, write_checkpoint_files
    from model.lora import adapter_parameters, attach_lora
    from model.presets import build_model
    from model.shards import Manifest
    from model.tokenizer import load_tokenizer

    database = sqlite_url(tmp_path / "run.db")
    sessions = record_run(database, corpus_dir, rounds=2)
    manifest = Manifest.load(corpus_dir / "manifest.json")
    base_dir = tmp_path / "round-000001"
    base_dir.mkdir()
    write_checkpoint_files(base_dir, build_model("tiny", manifest.vocab_size, seed=0), load_tokenizer(corpus_dir / "tokenizer"),
                           {"run_id": "run-under-test", "completed_round": 1, "next_round": 2, "lineage_head": 0,
                            "config_version": "genesis", "saved_at": time.time(),
                            "run_config": {"corpus_root_hash": manifest.root_hash(), "model_preset": "tiny"}})
    base = read_checkpoint(base_dir)
    settings = FinetuneSettings(checkpoint=base_dir, out=tmp_path / "tuned", rounds=2, max_tokens=64)
    model = attach_lora(build_model("tiny", manifest.vocab_size, seed=0), lora_settings(settings))
    rounds = [{"round": r, "sites": ["bank", "hospital"], "examples": 40 + r, "failures": []} for r in (1, 2)]
    write_outputs(settings, base, model, adapter_parameters(model), rounds, {}, {}, flower_run_id=1)

    result = summary(str(tmp_path / "tuned"), "--data", str(corpus_dir), "--database", database)
    assert result.exit_code == 0, result.output
    merged = tmp_path / "tuned" / "merged"  # beside the tuned model's card
    document = json.loads((merged / "TRAINING_SUMMARY.json").read_text())
    private = document["sources"]["private"]
    assert private["sites"] == ["bank", "hospital"] and private["examples_per_round"] == {"1": 41, "2": 42}
    assert list(document["sources"]) == ["private"]  # no other data
    assert document["general"]["training_data_size"]["text"]["tokens_at_most"] == (41 + 42) * 64
    assert document["general"]["model"]["dependencies"]["base"]["params_digest"] == base.params_digest
    base_tokens = sum(lineage_up_to(sessions, 1)["source"].values())
    assert document["base_summary"]["general"]["training_data_size"]["text"]["tokens"] == base_tokens
    markdown = (merged / "TRAINING_SUMMARY.md").read_text()
    assert "Private, non-publicly available data of the 2 participating sites (bank, hospital)" in markdown
    assert markdown.index("## Base model: its training-content summary") < markdown.index("### 1. General information")

    # A base checkpoint that is not the one the fine-tune recorded is refused.
    info = json.loads((base_dir / "checkpoint.json").read_text())
    (base_dir / "checkpoint.json").write_text(json.dumps({**info, "params_digest": "0" * 64}))
    moved = summary(str(merged), "--data", str(corpus_dir), "--database", database, "--force")
    assert moved.exit_code == 2 and "not the base this fine-tune recorded" in moved.output
