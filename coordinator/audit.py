"""`essaim audit verify`: recompute what can be recomputed and check every claim against it.

Shards against the manifest (sha256 of each file), the database against the
manifest, every lineage record against the lease it names, the accounting
invariant (no token range lost or counted twice), and each checkpoint against its
own digest and the round the coordinator recorded. Each problem is one sentence
that names the shard, range, record or file.

Checked work (coordinator/verification.py) is audited too: every lineage record's
verification agrees with its round's check (verified: passed, rejected: failed), and every
quarantined worker has the failed check that quarantined it. A quarantined worker is a
finding, not a problem: the run is consistent, and the audit names the worker, the round and
why its check failed. The tokens verified, unverified and rejected are counted apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from coordinator.accounting import accounting_problems
from coordinator.card import in_checkpoint
from coordinator.energy import JOULES_PER_KWH
from coordinator.evaluations import checkpoint_evaluations, evaluation_problems
from coordinator.store import Check, Lease, LineageRecord, Round, Shard, Worker, meta_value
from coordinator.verification import CREDIT_STATES
from model.checkpoints import CheckpointError, load_model, read_checkpoint
from model.shards import Manifest, ShardIntegrityError, verify_shard


@dataclass(frozen=True)
class AuditResult:
    problems: list[str]
    shards: int
    lineage_records: int
    checkpoints: int
    findings: list[str] = field(default_factory=list)  # what is consistent but worth knowing: quarantined workers
    credit: dict[str, int] = field(default_factory=dict)  # tokens in kept rounds, by verification state
    energy_kwh: float = 0.0  # what the kept rounds' lineage records cost (coordinator/energy.py)


def verify_run(sessions: sessionmaker[Session], data_dir: Path, checkpoints: list[Path]) -> AuditResult:
    manifest = Manifest.load(data_dir / "manifest.json")
    problems = _shard_problems(manifest, data_dir)
    with sessions() as session:
        problems += _database_problems(session, manifest)
        records = session.scalars(select(LineageRecord).order_by(LineageRecord.id)).all()
        problems += _lineage_problems(session, records)
        problems += _verification_problems(session, records)
        findings = _quarantine_findings(session)
        problems += accounting_problems(sessions)
        for path in checkpoints:
            problems += _checkpoint_problems(session, Path(path), manifest)
        problems += evaluation_problems(session)  # figures stored only of the parameters each round kept
        findings += checkpoint_evaluations(session, checkpoints)
    energy_kwh = sum(r.energy_joules for r in records if r.rewound_at is None) / JOULES_PER_KWH
    return AuditResult(problems, len(manifest.shards), len(records), len(checkpoints), findings, _credit(records),
                       energy_kwh)


def _shard_problems(manifest: Manifest, data_dir: Path) -> list[str]:
    problems = []
    for shard in [*manifest.shards, *manifest.heldout]:  # held-out shards too: the run is evaluated on them
        try:
            verify_shard(data_dir / shard.file, shard.sha256, shard.tokens, shard.dtype)
        except ShardIntegrityError as error:
            problems.append(f"shard {shard.shard_id}: {error}")
    return problems


def _database_problems(session: Session, manifest: Manifest) -> list[str]:
    recorded = meta_value(session, "corpus_root_hash")
    if recorded != manifest.root_hash():
        return [f"the database's corpus is {recorded}, the manifest's {manifest.root_hash()}: "
                "they belong to different runs"]
    problems = []
    stored = {shard.id: shard for shard in session.scalars(select(Shard))}
    for entry in manifest.shards:
        row = stored.pop(entry.shard_id, None)
        if row is None:
            problems.append(f"shard {entry.shard_id} is in the manifest but not in the database")
        elif (row.sha256, row.tokens) != (entry.sha256, entry.tokens):
            problems.append(f"shard {entry.shard_id}: the database records sha256 {row.sha256[:12]} and {row.tokens} "
                            f"tokens, the manifest {entry.sha256[:12]} and {entry.tokens}")
    problems += [f"shard {shard_id} is in the database but not in the manifest" for shard_id in sorted(stored)]
    return problems


def _lineage_problems(session: Session, records: list[LineageRecord]) -> list[str]:
    problems = []
    for record in records:
        where = (f"lineage record {record.id} (round {record.round}, worker {record.worker_id[:12]}, shard "
                 f"{record.shard_id} epoch {record.epoch} tokens {record.start}..{record.end})")
        lease = session.get(Lease, record.lease_id)
        if lease is None:
            problems.append(f"{where} names lease {record.lease_id}, which was never granted")
            continue
        trained_end = lease.start + lease.tokens_consumed
        if (lease.shard_id, lease.epoch, lease.start, trained_end) != (record.shard_id, record.epoch, record.start, record.end):
            problems.append(f"{where}: its lease {lease.id} trained shard {lease.shard_id} epoch {lease.epoch} tokens "
                            f"{lease.start}..{trained_end}, so this range was never leased as recorded")
        if (lease.worker_id, lease.round) != (record.worker_id, record.round):
            problems.append(f"{where}: its lease {lease.id} went to worker {lease.worker_id[:12]} in round {lease.round}")
        expected_state = "rewound" if record.rewound_at is not None else "completed"
        if lease.state != expected_state:
            problems.append(f"{where}: its lease {lease.id} is {lease.state}, not {expected_state}")
    return problems


def _verification_problems(session: Session, records: list[LineageRecord]) -> list[str]:
    """Each record's verification as its round's check decided; each quarantine backed by a failed check."""
    checks = {(check.worker_id, check.round): check for check in session.scalars(select(Check))}
    expected = {"passed": "verified", "failed": "rejected"}
    problems = []
    for record in records:
        check = checks.get((record.worker_id, record.round))
        decided = "unverified"
        if check is not None and check.decided_at is not None and record.created_at <= check.decided_at:
            decided = expected.get(check.status, "unverified")  # a record made later (a rewound round's redo): none
        if record.verification != decided:
            found = f"its check {check.id} is {check.status}" if check is not None else "its round was never checked"
            problems.append(f"lineage record {record.id} (round {record.round}, worker {record.worker_id[:12]}) is "
                            f"credited {record.verification!r}, but {found}: it should be {decided!r}")
    for worker in session.scalars(select(Worker).where(Worker.quarantined_at.is_not(None))):
        check = session.get(Check, worker.quarantine_check) if worker.quarantine_check is not None else None
        if check is None or (check.worker_id, check.status) != (worker.id, "failed"):
            problems.append(f"worker {worker.name} ({worker.id[:12]}) is quarantined, but check "
                            f"{worker.quarantine_check} is not a failed check of it: nothing backs the quarantine")
    return problems


def _quarantine_findings(session: Session) -> list[str]:
    """Each quarantined worker, with the check that failed: the round, what triggered it, and why."""
    findings = []
    quarantined = session.scalars(select(Worker).where(Worker.quarantined_at.is_not(None)).order_by(Worker.name))
    for worker in quarantined:
        check = session.get(Check, worker.quarantine_check) if worker.quarantine_check is not None else None
        trigger = f" ({check.trigger})" if check is not None else ""
        records = session.scalars(select(LineageRecord).where(LineageRecord.worker_id == worker.id)).all()
        rejected = sum(r.end - r.start for r in records if r.verification == "rejected")
        unverified = sum(r.end - r.start for r in records if r.verification == "unverified" and r.rewound_at is None)
        findings.append(f"worker {worker.name} ({worker.id}, {worker.institution}) is quarantined: check "
                        f"{worker.quarantine_check}{trigger} of its round {worker.quarantine_round} failed: "
                        f"{worker.quarantine_reason}; {rejected} of its tokens are credited rejected, {unverified} "
                        "unverified (a ledger's retrain decision has them trained again)")
    return findings


def _credit(records: list[LineageRecord]) -> dict[str, int]:
    """Tokens of records no rewind removed, by verification state."""
    tokens = dict.fromkeys(CREDIT_STATES, 0)
    for record in records:
        if record.rewound_at is None:
            tokens[record.verification] = tokens.get(record.verification, 0) + record.end - record.start
    return tokens


def _checkpoint_problems(session: Session, path: Path, manifest: Manifest) -> list[str]:
    try:
        checkpoint = read_checkpoint(path)
        load_model(checkpoint)
    except (CheckpointError, OSError, ValueError) as error:
        return [f"checkpoint {path}: {error}"]
    where = f"checkpoint {path} (round {checkpoint.completed_round})"
    problems = []
    if checkpoint.run_config.get("corpus_root_hash") != manifest.root_hash():
        problems.append(f"{where} was trained on corpus {checkpoint.run_config.get('corpus_root_hash')}, "
                        f"not this manifest's {manifest.root_hash()}")
    recorded = session.get(Round, checkpoint.completed_round)
    if recorded is None:
        problems.append(f"{where}: the coordinator has no record of that round")
    elif recorded.params_digest != checkpoint.params_digest:
        problems.append(f"{where}: its weights hash to {checkpoint.params_digest[:16]}, the coordinator recorded "
                        f"{recorded.params_digest[:16]} for that round")
    traced = set(session.scalars(select(LineageRecord.round).where(in_checkpoint(checkpoint))))
    untraced = sorted(set(range(checkpoint.completed_round + 1)) - traced)
    if untraced:
        problems.append(f"{where}: rounds {untraced} have no lineage record, so their tokens cannot be traced")
    return problems
