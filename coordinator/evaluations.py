"""Held-out evaluations in the run's records: checked as reported, kept with the round, shown in cards and audits.

A worker evaluates the parameters of every ``eval_every_rounds``-th round on the corpus's
held-out split (worker/evaluation.py) and sends the figures with its report. They are
refused at the edge if malformed (CompleteRound: INVALID_ARGUMENT), filed with the report,
and stored (the ``evaluations`` table) once the report is kept: figures of parameters the
round did not keep are never stored, nor figures from a member other than the one the
group's statements designate to evaluate (model.eval_figures.evaluator_of). A round's first
kept figures for a (group, name) are the ones kept; later ones (a retry, another group's
member vouching for the same parameters) are ignored: a group's members hold bit-identical
parameters.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.store import Evaluation, Round, insert_if_absent
from model.eval_figures import EvalFigure, evaluator_of, figure_problem
from protocol import essaim_pb2 as pb

if TYPE_CHECKING:
    from coordinator.rounds import RoundReport  # which imports this module
    from model.checkpoints import Checkpoint  # which imports torch: the coordinator's service never loads it

log = logging.getLogger("essaim.coordinator")

MAX_FIGURES = 1024  # one report's figures: "all", a few languages, and every source of a large mixture


def reported_figures(request: pb.CompleteRoundRequest) -> tuple[EvalFigure, ...]:
    """A report's evaluation as figures, () without one; ValueError says what is wrong with a bad one."""
    if not request.HasField("evaluation"):
        return ()
    evaluation = request.evaluation
    if evaluation.params_digest != request.params_digest:
        raise ValueError(f"the evaluation is of parameters {evaluation.params_digest[:12]!r}, not the report's "
                         f"{request.params_digest[:12]!r}: evaluate the parameters after the round's outer step")
    if not 0 < len(evaluation.figures) <= MAX_FIGURES:
        raise ValueError(f"the evaluation has {len(evaluation.figures)} figures: send 1 to {MAX_FIGURES}")
    figures = tuple(EvalFigure(f.group, f.name, f.tokens, f.bytes, f.loss, f.bits_per_byte)
                    for f in evaluation.figures)
    for figure in figures:
        problem = figure_problem(figure)
        if problem:
            raise ValueError(f"evaluation {problem}")
    if len({(f.group, f.name) for f in figures}) != len(figures):
        raise ValueError("the evaluation gives a (group, name) twice: send one figure for each")
    return figures


def record_evaluation(session: Session, worker_id: str, report: RoundReport, now: float) -> None:
    """Store a kept report's figures; those the round already has stay (insert-if-absent, as two processes may race)."""
    if not report.evaluation:
        return
    designated = evaluator_of(report.round, [worker_id, *(member.worker_id for member in report.members)])
    if designated != worker_id:
        log.warning("round %d: worker %s sent held-out figures, but its group's statements name %s to evaluate: "
                    "ignored", report.round, worker_id[:8], designated[:8])
        return
    session.execute(
        insert_if_absent(session, Evaluation, ["round", "group", "name"])
        .values([dict(round=report.round, params_digest=report.params_digest, group=f.group, name=f.name,
                      tokens=f.tokens, bytes=f.bytes, loss=f.loss, bits_per_byte=f.bits_per_byte, worker_id=worker_id,
                      created_at=now)
                 for f in report.evaluation])
    )


def evaluation_summary(session: Session, checkpoint: Checkpoint) -> dict | None:
    """The latest evaluation of the rounds a checkpoint holds, and how each figure moved since the first one."""
    rows = session.scalars(select(Evaluation).where(Evaluation.round <= checkpoint.completed_round)
                           .order_by(Evaluation.round, Evaluation.id)).all()
    if not rows:
        return None
    latest = rows[-1].round
    first: dict[tuple[str, str], Evaluation] = {}
    for row in rows:
        first.setdefault((row.group, row.name), row)
    figures = []
    for row in (r for r in rows if r.round == latest):
        start = first[(row.group, row.name)]
        figures.append({"group": row.group, "name": row.name, "tokens": row.tokens, "bytes": row.bytes,
                        "loss": row.loss, "bits_per_byte": row.bits_per_byte, "first_round": start.round,
                        "first_bits_per_byte": start.bits_per_byte,
                        "change_bits_per_byte": row.bits_per_byte - start.bits_per_byte})
    order = {"all": 0, "language": 1, "source": 2}
    figures.sort(key=lambda f: (order.get(f["group"], 3), f["name"]))
    return {"round": latest, "params_digest": rows[-1].params_digest,
            "of_these_weights": rows[-1].params_digest == checkpoint.params_digest,
            "rounds_evaluated": sorted({r.round for r in rows}), "figures": figures}


def evaluation_markdown(summary: dict | None) -> list[str]:
    """The model card's section (no lines without an evaluation)."""
    if not summary:
        return []
    which = "these weights" if summary["of_these_weights"] else f"the parameters of round {summary['round']}"
    rounds = summary["rounds_evaluated"]
    lines = [
        "## Held-out evaluation",
        "",
        f"Measured on the corpus's held-out split (documents set aside at `essaim data prepare`, never trained on), "
        f"on {which}, after round {summary['round']}; evaluated at {len(rounds)} round(s) from round {rounds[0]} on. "
        "Bits per byte compare across tokenizers; the change is since the first evaluation.",
        "",
        "| group | name | tokens | loss (nats/token) | bits per byte | first | change |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {f['group']} | {f['name']} | {f['tokens']:,} | {f['loss']:.3f} | {f['bits_per_byte']:.3f} "
              f"| {f['first_bits_per_byte']:.3f} (round {f['first_round']}) | {f['change_bits_per_byte']:+.3f} |"
              for f in summary["figures"]]
    return [*lines, ""]


def evaluation_problems(session: Session) -> list[str]:
    """Stored figures of parameters their round did not keep (the audit's check)."""
    kept = dict(session.execute(select(Round.number, Round.params_digest)).all())
    problems = []
    stored = {tuple(row) for row in session.execute(select(Evaluation.round, Evaluation.params_digest))}
    for round_number, digest in sorted(stored):
        if kept.get(round_number) != digest:
            problems.append(f"the evaluation of round {round_number} is of parameters {digest[:16]}, but the round "
                            f"kept {str(kept.get(round_number, 'none'))[:16]}")
    return problems


def checkpoint_evaluations(session: Session, paths: list[Path]) -> list[str]:
    """The audit's line for each checkpoint: the latest evaluation of the rounds it holds (none without one)."""
    from model.checkpoints import CheckpointError, read_checkpoint  # torch: only where checkpoints are read

    lines = []
    for path in paths:
        try:
            checkpoint = read_checkpoint(Path(path))
        except CheckpointError:
            continue  # the audit names it as a problem already
        summary = evaluation_summary(session, checkpoint)
        if summary is None:
            continue
        overall = next((f for f in summary["figures"] if f["group"] == "all"), summary["figures"][0])
        which = "its weights" if summary["of_these_weights"] else f"round {summary['round']}'s parameters"
        lines.append(f"checkpoint {path} (round {checkpoint.completed_round}): held-out evaluation of {which}: "
                     f"{overall['bits_per_byte']:.3f} bits per byte, loss {overall['loss']:.3f} ({overall['name']}; "
                     f"{overall['change_bits_per_byte']:+.3f} bits per byte since round {overall['first_round']})")
    return lines
