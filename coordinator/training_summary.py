"""`essaim audit summary`: the public summary of a checkpoint's training content, after the EU AI Office's template.

The template (Explanatory Notice and Template for the Public Summary of Training Content for
general-purpose AI models, AI Office, July 2025; Article 53(1)(d) of the AI Act) asks for:
1. general information (provider, model, modalities, data size, dates, languages); 2. the data
sources by kind, each kind's share, time span and languages; 3. data processing (respect of
text-and-data-mining reservations, removal of illegal content, other processing).

Everything here comes from records: the tokens the checkpoint holds, per source, language and
licence (the lineage, through coordinator/card.py), the manifest, and the preparation report
(what the filters and the deduplication removed, per source). What no record holds is said to be
missing, never guessed: the corpus config records a source's licence, not how it was obtained, so
a source's kind is the provider's statement (`--source-kind NAME=KIND`) or "not stated".

A fine-tune's summary covers what the fine-tune added: the participating sites' private data,
described only as the fine-tune's card already describes it (sites, example counts), with the
base model's summary embedded (the template's "model dependencies").
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from coordinator.card import build_card
from model.checkpoints import Checkpoint, CheckpointError, latest_checkpoint, read_checkpoint
from model.corpus import REPORT_FILE
from model.shards import Manifest

TEMPLATE = ("European AI Office, Explanatory Notice and Template for the Public Summary of Training Content for "
            "general-purpose AI models (July 2025), AI Act Article 53(1)(d)")
# The template's section 2 headings, by the kind `--source-kind` names.
SOURCE_KINDS = {
    "public": "2.1 Publicly available datasets",
    "licensed": "2.2.1 Private datasets commercially licensed by rightsholders or their representatives",
    "private": "2.2.2 Private datasets obtained from other third parties",
    "crawled": "2.3 Data crawled and scraped from online sources",
    "user": "2.4 User data",
    "synthetic": "2.5 Synthetic data",
    "other": "2.6 Other sources of data",
}
NOT_STATED = "not_stated"
ILLEGAL_CONTENT_FILTERS = ("blocked_url", "banned_words")  # model/filters.py: the lists a corpus config gives
DEDUPLICATION = ("exact_duplicate", "near_duplicate")
TDM_OPT_OUT = "tdm_opt_out"  # model/filters.py: documents whose URL a reservation list names


class SummaryError(ValueError):
    """The summary cannot be made from what was given; the message says what to give instead."""


def size_range(tokens: int) -> str:
    """The template's ranges of training data size for text."""
    if tokens < 1_000_000_000:
        return "less than 1 billion tokens"
    return "1 billion to 10 trillion tokens" if tokens <= 10_000_000_000_000 else "more than 10 trillion tokens"


def parse_source_kinds(declared: list[str], manifest: Manifest) -> dict[str, str]:
    """NAME=KIND options into {source: kind}, refused when a name or kind is unknown."""
    sources = {source.name for source in manifest.sources}
    kinds: dict[str, str] = {}
    for entry in declared:
        name, equals, kind = entry.partition("=")
        if not equals or kind not in SOURCE_KINDS:
            raise SummaryError(f"--source-kind {entry!r}: write SOURCE=KIND, KIND one of {', '.join(SOURCE_KINDS)}")
        if name not in sources:
            raise SummaryError(f"--source-kind {entry!r}: {name!r} is not a source of this corpus "
                               f"(its sources: {', '.join(sorted(sources))})")
        kinds[name] = kind
    return kinds


def summary_of(sessions: sessionmaker[Session], path: Path, data_dir: Path, declared_kinds: list[str],
               provider: str = "") -> tuple[dict, Path]:
    """The summary of a checkpoint, or of a fine-tune's output (its --out or merged/), and where its model card is.

    For a fine-tune, --data and the database are the pretraining run's: they give the base's summary.
    """
    path = latest_checkpoint(path) or path
    if not (data_dir / "manifest.json").is_file():
        raise SummaryError(f"{data_dir} holds no manifest.json: point --data at the run's prepared corpus")
    kinds = parse_source_kinds(declared_kinds, Manifest.load(data_dir / "manifest.json"))
    if (path / "checkpoint.json").is_file():
        return build_summary(sessions, read_checkpoint(path), data_dir, kinds, provider), path
    from coordinator.finetune_lineage import RECORD_FILE, read_record  # transformers and peft: only for a fine-tune

    if not (path / RECORD_FILE).is_file():
        raise SummaryError(f"{path} is neither a checkpoint (no checkpoint.json) nor a fine-tune's output (no "
                           f"{RECORD_FILE}): give a round-NNNNNN directory, the directory holding 'latest', or a "
                           "fine-tune's --out or merged/ directory")
    record = read_record(path)
    base_path = Path(record["base"]["path"])
    try:
        base = read_checkpoint(base_path)
    except CheckpointError as error:
        raise SummaryError(f"the fine-tune's base checkpoint is unreadable ({error}): its summary needs the base "
                           "checkpoint where the fine-tune recorded it") from None
    if base.params_digest != record["base"]["params_digest"]:
        raise SummaryError(f"{base_path} holds weights {base.params_digest[:16]}…, not the base this fine-tune "
                           f"recorded ({record['base']['params_digest'][:16]}…)")
    card_dir = path / "merged" if (path / "merged" / RECORD_FILE).is_file() else path  # the tuned model's card is there
    return build_finetune_summary(record, build_summary(sessions, base, data_dir, kinds, provider), provider), card_dir


def build_summary(sessions: sessionmaker[Session], checkpoint: Checkpoint, data_dir: Path,
                  kinds: dict[str, str], provider: str = "") -> dict:
    """A pretrained checkpoint's summary as a JSON-ready dict (see the module's docstring)."""
    card = build_card(sessions, checkpoint, data_dir)  # refuses a database or corpus of another run
    total = card["tokens"]
    if total == 0:
        raise SummaryError(f"the database records no trained token up to round {checkpoint.completed_round}: "
                           "point --data/--database at the run that trained this checkpoint")
    sources = {name: {"name": name, "kind": kinds.get(name, NOT_STATED), **entry}
               for name, entry in card["sources"].items()}
    return {
        "template": TEMPLATE,
        "generated_at": time.time(),
        "general": {
            "provider": provider or None,
            "model": {"kind": "pretrained", "run_id": checkpoint.run_id, "completed_round": checkpoint.completed_round,
                      "params_digest": checkpoint.params_digest, "preset": card["model"]["preset"],
                      "checkpoint": str(checkpoint.path), "dependencies": None},
            "modalities": ["text"],
            "training_data_size": {"text": {"tokens": total, "range": size_range(total)}},
            "dates": {"from": min(s["date_from"] for s in sources.values()),
                      "to": max(s["date_to"] for s in sources.values())},
            "languages": _shares(card["tokens_by_language"], total),
            "licences": _shares(card["tokens_by_licence"], total),
            "corpus": card["corpus"],
        },
        "sources": {kind: _kind_section(kind, [s for s in sources.values() if s["kind"] == kind], total)
                    for kind in (*SOURCE_KINDS, NOT_STATED)},
        "processing": _processing(data_dir, list(sources)),
        "energy": _energy(card["energy"]),
    }


def _shares(tokens: dict[str, int], total: int) -> dict[str, dict]:
    return {name: {"tokens": count, "share": count / total} for name, count in tokens.items()}


def _kind_section(kind: str, sources: list[dict], total: int) -> dict:
    tokens = sum(s["tokens"] for s in sources)
    return {
        "heading": SOURCE_KINDS.get(kind, "Sources whose kind is not stated"),
        "used": bool(sources), "tokens": tokens, "share": tokens / total,
        "date_from": min((s["date_from"] for s in sources), default=None),
        "date_to": max((s["date_to"] for s in sources), default=None),
        "languages": sorted({s["language"] for s in sources}),
        "licences": sorted({s["licence"] for s in sources}),
        "sources": [{key: s[key] for key in ("name", "language", "licence", "date_from", "date_to", "tokens", "share")}
                    for s in sorted(sources, key=lambda s: -s["tokens"])],
    }


def _processing(data_dir: Path, trained_sources: list[str]) -> dict:
    """What the preparation did to the trained sources' documents, from its report (whole sources, all epochs)."""
    report_file = data_dir / REPORT_FILE
    processing: dict = {
        "tdm_reservations": {"list_configured": False},  # unless the report names the lists its sources were checked on
        "preparation_report": None,
    }
    if not report_file.is_file():
        return processing
    report = json.loads(report_file.read_text(encoding="utf-8"))
    per_source = {}
    for name in trained_sources:
        counts = report["sources"].get(name)
        if counts is None:
            continue
        removed = {reason: figures["documents"] for reason, figures in counts["removed"].items()}
        per_source[name] = {"records": counts["records"], "malformed_records": counts["bad_records"],
                            "kept_documents": counts["kept_documents"], "removed_documents": dict(sorted(removed.items()))}
    totals: dict[str, int] = {}
    for figures in per_source.values():
        for reason, documents in figures["removed_documents"].items():
            totals[reason] = totals.get(reason, 0) + documents
    lists = {name: report.get("tdm_opt_outs", {})[name] for name in per_source if report.get("tdm_opt_outs", {}).get(name)}
    if lists:
        processing["tdm_reservations"] = {"list_configured": True, "lists": lists,
                                          "removed_documents": totals.get(TDM_OPT_OUT, 0)}
    processing["preparation_report"] = {
        "file": REPORT_FILE,
        "records": sum(f["records"] for f in per_source.values()),
        "malformed_records": sum(f["malformed_records"] for f in per_source.values()),
        "kept_documents": sum(f["kept_documents"] for f in per_source.values()),
        "illegal_content_filters": {reason: totals.get(reason, 0) for reason in ILLEGAL_CONTENT_FILTERS},
        "deduplication": {reason: totals.get(reason, 0) for reason in DEDUPLICATION},
        "quality_filters": {reason: count for reason, count in sorted(totals.items())
                            if reason not in (*ILLEGAL_CONTENT_FILTERS, *DEDUPLICATION, TDM_OPT_OUT)},
        "per_source": per_source,
    }
    return processing


def _energy(energy: dict) -> dict | None:
    """The card's energy (coordinator/energy.py) as the summary states it: kWh, and CO2e where workers declared
    their grid's intensity; None when no round of the checkpoint reported its energy."""
    if energy["kwh"] <= 0:
        return None  # not measured: workers that report no energy leave it 0
    declared_share = 1.0 - energy["undeclared_intensity_share"]
    return {
        "kwh": energy["kwh"],
        "tokens_measured": energy["tokens"] - energy["tokens_without_energy"],
        "kwh_with_declared_grid": energy["kwh"] * declared_share,
        "emissions_kg_co2e": energy["emissions_kg_co2e"] if declared_share > 0 else None,
    }


def build_finetune_summary(record: dict, base_summary: dict, provider: str = "") -> dict:
    """A fine-tune's summary: what its sites added, described only by the public record, on the base's summary."""
    examples = sum(entry["examples"] for entry in record["rounds"])
    bound = examples * record["training"]["max_tokens"]  # each example is cut to max_tokens
    return {
        "template": TEMPLATE,
        "generated_at": time.time(),
        "general": {
            "provider": provider or None,
            "model": {"kind": record["kind"], "adapter_sha256": record["adapter"]["sha256"],
                      "dependencies": {"base": record["base"]}},  # its summary: base_summary
            "modalities": ["text"],
            "training_data_size": {"text": {"examples": examples, "tokens_at_most": bound,
                                            "range": size_range(bound)}},
            "dates": None, "languages": None,  # the sites' data is private: neither is recorded
        },
        "sources": {"private": {
            "heading": SOURCE_KINDS["private"], "used": True, "sites": record["sites"],
            "examples_per_round": {str(entry["round"]): entry["examples"] for entry in record["rounds"]},
        }},
        "processing": {"tdm_reservations": {"list_configured": False}, "privacy": record["privacy"]},
        "base_summary": base_summary,
    }
