"""What `essaim report` plots, read from a run's database: per round, per language, per institution.

Rounds are the kept ones (a rewind deletes the rounds it forgets, and their contributions);
the x axis of every curve is the tokens trained through a round, summed over the kept rounds in
order. Held-out evaluations are placed at the tokens trained through the round they evaluated
(the parameters after its outer step); one of a round the rounds table no longer holds (rewound)
has no place on that axis and is left out. Tokens per institution are the lineage's, rewound
records excepted, by what the checks of their rounds found.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from coordinator.store import Contribution, Evaluation, LineageRecord, Round, meta_value
from coordinator.verification import CREDIT_STATES
from model.shards import Manifest


class ReportError(ValueError):
    """The database and corpus do not make a run to report on; the message says what to give."""


@dataclass(frozen=True)
class RoundPoint:
    number: int
    tokens: int                   # trained in this round (its kept reports)
    cumulative_tokens: int        # trained through this round
    mean_loss: float              # of its kept reports
    compute_share: float | None   # time in inner steps / wall time, over its contributions (None: none recorded)
    bytes_sent: int               # averaging traffic of its contributions
    energy_joules: dict[str, float]  # by how it was measured ("nvml", "rapl", "estimate"); {} when none


@dataclass(frozen=True)
class EvaluationPoint:
    round: int
    cumulative_tokens: int
    loss: float                   # nats per token
    bits_per_byte: float


@dataclass(frozen=True)
class RunSeries:
    rounds: list[RoundPoint]
    language_evaluations: dict[str, list[EvaluationPoint]]  # language -> points, oldest round first
    institution_tokens: dict[str, dict[str, int]]           # institution -> verification state -> tokens


def run_series(sessions: sessionmaker[Session], data_dir: Path | None = None) -> RunSeries:
    """The run's figures; with its corpus directory, refused if the database holds another corpus's run."""
    with sessions() as session:
        _check_run(session, data_dir)
        rounds = _rounds(session)
        tokens_through = {point.number: point.cumulative_tokens for point in rounds}
        return RunSeries(rounds, _language_evaluations(session, tokens_through), _institution_tokens(session))


def _check_run(session: Session, data_dir: Path | None) -> None:
    corpus_root = meta_value(session, "corpus_root_hash")
    if corpus_root is None:
        raise ReportError("the database holds no run (no corpus loaded): point --data at the run's directory "
                          "or --database at the run's database")
    manifest_file = data_dir / "manifest.json" if data_dir else None
    if manifest_file and manifest_file.is_file() and Manifest.load(manifest_file).root_hash() != corpus_root:
        raise ReportError(f"the database's corpus {corpus_root[:12]} is not the one in {data_dir}: "
                          "give the --data and --database of the same run")


def _rounds(session: Session) -> list[RoundPoint]:
    costs = {
        number: (inner, wall, sent)
        for number, inner, wall, sent in session.execute(
            select(Contribution.round, func.sum(Contribution.inner_seconds), func.sum(Contribution.wall_seconds),
                   func.sum(Contribution.bytes_sent)).group_by(Contribution.round))
    }
    energy: dict[int, dict[str, float]] = defaultdict(dict)
    for number, method, joules in session.execute(
        select(Contribution.round, Contribution.energy_method, func.sum(Contribution.energy_joules))
        .where(Contribution.energy_joules > 0).group_by(Contribution.round, Contribution.energy_method)
    ):
        energy[number][method or "unstated"] = float(joules)
    points, cumulative = [], 0
    for row in session.scalars(select(Round).order_by(Round.number)):
        cumulative += row.tokens
        inner, wall, sent = costs.get(row.number, (0.0, 0.0, 0))
        points.append(RoundPoint(
            number=row.number, tokens=row.tokens, cumulative_tokens=cumulative,
            mean_loss=row.loss_sum / max(row.reports, 1), compute_share=inner / wall if wall else None,
            bytes_sent=int(sent or 0), energy_joules=energy.get(row.number, {}),
        ))
    return points


def _language_evaluations(session: Session, tokens_through: dict[int, int]) -> dict[str, list[EvaluationPoint]]:
    by_language: dict[str, list[EvaluationPoint]] = defaultdict(list)
    for row in session.scalars(select(Evaluation).where(Evaluation.group == "language")
                               .order_by(Evaluation.name, Evaluation.round)):
        if row.round in tokens_through:
            by_language[row.name].append(
                EvaluationPoint(row.round, tokens_through[row.round], row.loss, row.bits_per_byte))
    return dict(by_language)


def _institution_tokens(session: Session) -> dict[str, dict[str, int]]:
    tokens: dict[str, dict[str, int]] = {}
    for institution, state, count in session.execute(
        select(LineageRecord.institution, LineageRecord.verification,
               func.sum(LineageRecord.end - LineageRecord.start))
        .where(LineageRecord.rewound_at.is_(None)).group_by(LineageRecord.institution, LineageRecord.verification)
    ):
        tokens.setdefault(institution, dict.fromkeys(CREDIT_STATES, 0))[state] = int(count)
    return dict(sorted(tokens.items()))
