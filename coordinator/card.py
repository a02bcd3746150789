"""Model and data cards, derived from lineage: what a checkpoint was trained on, by whom, under which configs.

A checkpoint holds the tokens of every lineage record of its rounds (up to its
completed round) that had not been rewound when it was saved: records of later
rounds, or of rounds a crash rewound before the save, are not in its weights.

Contributors are credited to an institution only as verified at Register (a
certificate from an institution the run admits, coordinator/admission.py); the
tokens of every other worker are the volunteers', under no institution.

Tokens are also told apart by what the checks of their rounds found (coordinator/verification.py):
verified (a validator's replay of the round agreed), rejected (it disagreed: the worker was
quarantined, but the round was kept, so its tokens are in the weights), or unverified (not checked,
or not yet). The card shows the three apart, overall and per institution.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from sqlalchemy import ColumnElement, and_, or_, select
from sqlalchemy.orm import Session, sessionmaker

from coordinator.energy import energy_markdown, energy_summary
from coordinator.evaluations import evaluation_markdown, evaluation_summary
from coordinator.mixture import target_shares
from coordinator.store import LineageRecord, Shard, Source, Worker, meta_value
from coordinator.verification import CREDIT_STATES
from governance.documents import proposal_id
from governance.ledger import Ledger
from model.checkpoints import Checkpoint
from model.corpus import REPORT_FILE
from model.shards import Manifest
from protocol.choices import INDEPENDENT


def in_checkpoint(checkpoint: Checkpoint) -> ColumnElement[bool]:
    """Lineage records whose tokens a checkpoint's weights hold (see the module's docstring)."""
    return and_(
        LineageRecord.round <= checkpoint.completed_round,
        or_(LineageRecord.rewound_at.is_(None), LineageRecord.rewound_at > checkpoint.saved_at),
    )


class CardError(ValueError):
    """The checkpoint and the run's records do not belong together."""


def build_card(
    sessions: sessionmaker[Session], checkpoint: Checkpoint, data_dir: Path, ledger: Ledger | None = None
) -> dict:
    """The card's figures, as a JSON-ready dict; with the run's ledger, what each config version changed."""
    manifest = Manifest.load(data_dir / "manifest.json")
    with sessions() as session:
        corpus_root = meta_value(session, "corpus_root_hash")
        _check_same_run(checkpoint, corpus_root, manifest)
        rows = session.execute(
            select(LineageRecord, Shard, Worker.name, Worker.quarantined_at)
            .join(Shard, Shard.id == LineageRecord.shard_id)
            .join(Worker, Worker.id == LineageRecord.worker_id)
            .where(in_checkpoint(checkpoint))
        ).all()
        sources = {s.name: s for s in session.scalars(select(Source))}
        evaluation = evaluation_summary(session, checkpoint)  # held-out figures, if workers evaluated
        energy = energy_summary(session, in_checkpoint(checkpoint))

    by_language: dict[str, int] = defaultdict(int)
    by_licence: dict[str, int] = defaultdict(int)
    by_source: dict[str, dict] = {}
    workers: dict[str, dict] = {}
    institutions: dict[str, dict] = {}
    config_versions: set[str] = set()
    checked = _by_credit()
    for record, shard, worker_name, quarantined_at in rows:
        tokens = record.end - record.start
        by_language[shard.language] += tokens
        by_licence[shard.licence] += tokens
        source = by_source.setdefault(shard.source, {"tokens": 0, "date_from": shard.date_from, "date_to": shard.date_to})
        source["tokens"] += tokens
        source["date_from"] = min(source["date_from"], shard.date_from)
        source["date_to"] = max(source["date_to"], shard.date_to)
        worker = workers.setdefault(record.worker_id, {"name": worker_name, "institution": record.institution,
                                                       "tokens": 0, "rounds": set(),
                                                       "quarantined": quarantined_at is not None})
        worker["tokens"] += tokens
        worker["rounds"].add(record.round)
        institution = institutions.setdefault(record.institution, {"tokens": 0, "workers": set(),
                                                                   "verification": _by_credit()})
        institution["tokens"] += tokens
        institution["workers"].add(record.worker_id)
        institution["verification"][record.verification] += tokens
        checked[record.verification] += tokens
        config_versions.add(record.config_version)

    total = sum(by_language.values())
    volunteers = institutions.get(INDEPENDENT, {"tokens": 0, "workers": set(), "verification": _by_credit()})
    targets = target_shares({name: s.weight for name, s in sources.items()})
    for name, entry in by_source.items():
        entry.update(language=sources[name].language, licence=sources[name].licence,
                     share=entry["tokens"] / total, target_share=targets.get(name, 0.0))
    card = {
        "checkpoint": {
            "path": str(checkpoint.path), "run_id": checkpoint.run_id, "completed_round": checkpoint.completed_round,
            "params_digest": checkpoint.params_digest, "saved_at": checkpoint.saved_at,
        },
        "model": {"preset": checkpoint.run_config.get("model_preset"), "vocab_size": manifest.vocab_size},
        "corpus": {"root_hash": corpus_root, "tokenizer_sha256": manifest.tokenizer_sha256},
        "tokens": total,
        "verification": checked,  # tokens by what the checks of their rounds found
        "tokens_by_language": dict(sorted(by_language.items())),
        "tokens_by_licence": dict(sorted(by_licence.items())),
        "sources": dict(sorted(by_source.items())),
        "institutions": {  # verified institutions only
            name: {"tokens": v["tokens"], "workers": len(v["workers"]), "verification": v["verification"]}
            for name, v in sorted(institutions.items()) if name != INDEPENDENT
        },
        "volunteers": {"tokens": volunteers["tokens"], "workers": len(volunteers["workers"]),
                       "verification": volunteers["verification"]},
        "workers": sorted(
            ({"name": v["name"], "institution": v["institution"], "tokens": v["tokens"], "rounds": len(v["rounds"]),
              "quarantined": v["quarantined"]} for v in workers.values()), key=lambda w: (-w["tokens"], w["name"]),
        ),
        "configs": {"versions": sorted(config_versions), "run_config": checkpoint.run_config},
        "energy": energy,  # kWh overall, by method, institution and round; emissions (coordinator/energy.py)
    }
    card["evaluation"] = evaluation  # the latest figures of its rounds, and their change since the first
    report = data_dir / REPORT_FILE
    if report.is_file():
        card["data_preparation"] = _preparation_summary(json.loads(report.read_text(encoding="utf-8")))
    if ledger is not None:
        card["configs"]["governance"] = _governance_summary(ledger, config_versions)
    return card


def _by_credit() -> dict[str, int]:
    """Tokens per verification state, every state present (0 when none)."""
    return dict.fromkeys(CREDIT_STATES, 0)


def _governance_summary(ledger: Ledger, versions: set[str]) -> dict:
    """Each config version in the lineage as the ledger has it: the genesis config, or a vote's change."""
    state = ledger.state
    reasons = {proposal_id(e["item"]): e["item"].get("reason", "") for e in ledger.entries
               if e["item"].get("kind") == "proposal"}
    accepted = {a.proposal: a for a in state.accepted}
    described = {}
    for version in sorted(versions):
        if version == state.genesis_hash:
            described[version] = {"genesis": True, "config": state.genesis["config"]}
        elif version in accepted:
            proposal = state.proposals[version]
            described[version] = {
                "activation_round": accepted[version].activation_round, "change": proposal.change,
                "reason": reasons[version], "author": proposal.author, "yes": sorted(proposal.yes),
                "no": sorted(proposal.no),
            }
        else:
            raise CardError(f"the lineage names config version {version[:16]}…, which this ledger (genesis "
                            f"{state.genesis_hash[:16]}…) never accepted: give the ledger of the run that trained it")
    return {"genesis": state.genesis_hash, "ledger_head": ledger.head, "versions": described}


def _check_same_run(checkpoint: Checkpoint, corpus_root: str | None, manifest: Manifest) -> None:
    claimed = checkpoint.run_config.get("corpus_root_hash")
    if corpus_root is None:
        raise CardError("the database holds no run (no corpus loaded): point --database at the run's database")
    if corpus_root != manifest.root_hash():
        raise CardError(f"the database's corpus {corpus_root[:12]} is not the one in --data "
                        f"({manifest.root_hash()[:12]}): point --data at the run's prepared corpus")
    if claimed != corpus_root:
        raise CardError(f"{checkpoint.path} was trained on corpus {str(claimed)[:12]}, the database's run on "
                        f"{corpus_root[:12]}: give the checkpoint and database of the same run")


def _preparation_summary(report: dict) -> dict:
    """What the filters removed, per reason, over all sources (no document content)."""
    removed: dict[str, int] = defaultdict(int)
    for counts in report["sources"].values():
        for reason, figures in counts["removed"].items():
            removed[reason] += figures["documents"]
    return {
        "records": sum(c["records"] for c in report["sources"].values()),
        "bad_records": sum(c["bad_records"] for c in report["sources"].values()),
        "kept_documents": sum(c["kept_documents"] for c in report["sources"].values()),
        "removed_documents": dict(sorted(removed.items())),
        "tokenizer_fertility": report.get("fertility", {}),
        "tdm_opt_out_lists": report.get("tdm_opt_outs", {}),  # source -> the reservation lists it was checked on
    }


def _opt_outs_line(lists: dict[str, list[dict]], removed: dict[str, int]) -> str:
    if not lists:
        return "No text-and-data-mining reservation (opt-out) list was configured for this corpus."
    files = sorted({entry["file"] for entries in lists.values() for entry in entries})
    return (f"Text-and-data-mining reservations (opt-outs) honoured: {removed.get('tdm_opt_out', 0):,} documents removed "
            f"(lists: {', '.join(files)}; sources checked: {', '.join(sorted(lists))}).")


def card_markdown(card: dict) -> str:
    checkpoint, total = card["checkpoint"], card["tokens"]
    lines = [
        f"# Model card: run {checkpoint['run_id']}, round {checkpoint['completed_round']}",
        "",
        f"- Model: `{card['model']['preset']}` preset, vocabulary {card['model']['vocab_size']:,}",
        f"- Weights: sha256 digest `{checkpoint['params_digest']}`",
        f"- Corpus: root hash `{card['corpus']['root_hash']}`, tokenizer `{card['corpus']['tokenizer_sha256'][:16]}`",
        f"- Trained tokens: {total:,}, under config versions {', '.join(card['configs']['versions']) or '-'}",
        "",
        "## Data by language",
        "",
        "| language | tokens | share |",
        "|---|---:|---:|",
        *(f"| {k} | {v:,} | {v / total:.1%} |" for k, v in card["tokens_by_language"].items()),
        "",
        "## Data by source",
        "",
        "| source | language | licence | dates | tokens | share | target |",
        "|---|---|---|---|---:|---:|---:|",
        *(f"| {k} | {v['language']} | {v['licence']} | {v['date_from']} to {v['date_to']} | {v['tokens']:,} "
          f"| {v['share']:.1%} | {v['target_share']:.1%} |" for k, v in card["sources"].items()),
        "",
        "## Data by licence",
        "",
        "| licence | tokens |",
        "|---|---:|",
        *(f"| {k} | {v:,} |" for k, v in card["tokens_by_licence"].items()),
        "",
        "## Contributors",
        "",
        "An institution is credited only for workers that presented, when they joined, a certificate signed with "
        "the key the run admits that institution with; every other worker is a volunteer, of no institution "
        f"(`{INDEPENDENT}`).",
        "",
        "Validators replay a sample of the rounds' reports: a worker's tokens of a round are *verified* when a "
        "replay agreed, *rejected* when it disagreed (the worker is quarantined; the round was kept, so they are in "
        "the weights), *unverified* when the round was not checked (or not yet).",
        "",
        "| verified institution | workers | tokens | verified by replay | unverified | rejected |",
        "|---|---:|---:|---:|---:|---:|",
        *(f"| {k} | {v['workers']} | {v['tokens']:,} | {_credit_cells(v['verification'])} |"
          for k, v in card["institutions"].items()),
        f"| volunteers (no institution) | {card['volunteers']['workers']} | {card['volunteers']['tokens']:,} "
        f"| {_credit_cells(card['volunteers']['verification'])} |",
        f"| all | {len(card['workers'])} | {total:,} | {_credit_cells(card['verification'])} |",
        "",
        "| worker | institution | rounds | tokens |",
        "|---|---|---:|---:|",
        *(f"| {w['name']}{' (quarantined)' if w['quarantined'] else ''} | {w['institution']} | {w['rounds']} "
          f"| {w['tokens']:,} |" for w in card["workers"]),
        "",
    ]
    lines += energy_markdown(card["energy"])
    lines += evaluation_markdown(card.get("evaluation"))
    preparation = card.get("data_preparation")
    if preparation:
        lines += [
            "## Data preparation",
            "",
            f"{preparation['records']:,} records read, {preparation['bad_records']:,} malformed, "
            f"{preparation['kept_documents']:,} kept. Removed by filter:",
            "",
            *(f"- {reason}: {count:,}" for reason, count in preparation["removed_documents"].items()),
            "",
            _opt_outs_line(preparation.get("tdm_opt_out_lists", {}), preparation["removed_documents"]),
            "",
        ]
    governance = card["configs"].get("governance")
    if governance:
        lines += ["## Governance", "",
                  f"Run genesis `{governance['genesis']}`, ledger head `{governance['ledger_head']}`. "
                  "The config versions this checkpoint was trained under:", ""]
        for version, entry in governance["versions"].items():
            if entry.get("genesis"):
                lines.append(f"- `{version[:16]}` (genesis): {json.dumps(entry['config'], sort_keys=True)}")
            else:
                lines.append(f"- `{version[:16]}` from round {entry['activation_round']}: "
                             f"{json.dumps(entry['change'], sort_keys=True)}, proposed by {entry['author']} "
                             f"(\"{entry['reason']}\"), yes: {', '.join(entry['yes'])}; no: {', '.join(entry['no']) or '-'}")
        lines.append("")
    lines += ["## Run configuration", "", "```json", json.dumps(card["configs"]["run_config"], indent=2), "```", ""]
    return "\n".join(lines)


def _credit_cells(tokens: dict[str, int]) -> str:
    return " | ".join(f"{tokens[state]:,}" for state in ("verified", "unverified", "rejected"))


def write_card(card: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown, document = out_dir / "MODEL_CARD.md", out_dir / "model_card.json"
    markdown.write_text(card_markdown(card), encoding="utf-8")
    document.write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return markdown, document
