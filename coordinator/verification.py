"""Checked work: which kept reports a validator replays, what its verdict does, and quarantine.

Workers are strangers: a report's claim (its pseudo-gradient's digest and norm, the loss on a
probe batch before and after, the order of its inner steps) says what it trained, and the
reducers' witnesses (worker/witness.py) say what it sent. A validator (an hpc or institution
worker: certified) replays the round's inner steps from the round's start state and compares;
a worker whose replay disagrees is quarantined. Checks are drawn when a round is decided
(docs/ARCHITECTURE.md, "Checked work"):

- **Sampled.** Each kept report carrying a claim is checked with probability

      p = min(1, verify_fraction x CLASS_FACTOR[trust class] x (1 + NEW_WORKER_BOOST / (1 + passed checks)))

  CLASS_FACTOR is 2 for a volunteer, 1 for an institution's worker and 0.5 for an hpc one;
  NEW_WORKER_BOOST is 4. At the default verify_fraction 0.025 a new volunteer is checked with
  p = 0.25 until a check of it passes. An offender's check never passes, so it stays at 0.25:
  it is caught within 10 rounds with probability 1 - 0.75^10, about 94 %. An established
  volunteer tends to p = 0.05 (0.025 x 2): the validators' cost. The draw uses the system's
  unpredictable random source: no worker can know in advance which of its rounds are checked.
- **Anomalies.** From the witnesses in the round's kept reports, a sender (mapped to its worker
  by the hivemind peer id it leased with) is checked with probability 1 when its witnessed part
  is not finite, when its norm is more than 3x its slice's median norm or less than a third of
  it, or, in a slice of 3 senders or more, when its cosine to the slice's aggregate is negative.
  With fewer than 3 senders a median cannot tell which one is off: a norm outside the band
  checks every sender of that slice. A reducer's witness about itself does not count.

A check needs the report's claim (a report without one cannot be replayed, so it is never
checked: its tokens stay unverified) and one check is opened per worker and round at most.
verify_fraction 0 turns checking off altogether: workers then keep their inner optimizer from
round to round, and a round can no longer be replayed from its start.

Verdicts: PASSED credits the round's lineage "verified" and counts towards the worker's passed
checks; FAILED credits it "rejected" and quarantines the worker (no more leases, its leases out
back to the pool, its reports awaiting a decision dropped, its later reports refused);
INCONCLUSIVE puts the check back for another validator once, then leaves it "inconclusive"
(the round stays unverified).
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.orm import Session

from coordinator.leases import HELD, LeaseError, return_to_pool
from coordinator.rounds import RoundReport
from coordinator.rewind import untrain
from coordinator.store import Check, FiledReport, Lease, LineageRecord, Round, Shard, Worker
from protocol import essaim_pb2 as pb
from protocol.choices import CERTIFIED_CLASSES, VOLUNTEER

CLASS_FACTOR = {"volunteer": 2.0, "institution": 1.0, "hpc": 0.5}
NEW_WORKER_BOOST = 4.0
NORM_SPREAD = 3.0       # a witnessed norm outside [median / 3, 3 x median] is an anomaly
MIN_SENDERS = 3         # a slice's median and cosine say who is off only among this many senders
CREDIT_STATES = ("unverified", "verified", "rejected")  # LineageRecord.verification


class Quarantined(LeaseError):
    """The worker failed a check: it gets no lease and none of its reports is credited."""

    def __init__(self, worker: Worker) -> None:
        super().__init__(f"worker {worker.id[:12]} is quarantined since round {worker.quarantine_round}: "
                         f"{worker.quarantine_reason}; its reports are not credited")


class NotAValidator(Exception):
    """A worker that may not validate asked for a check."""


class UnknownCheck(Exception):
    """A verdict names a check that was never opened."""


class VerdictRefused(Exception):
    """A verdict from a worker the check is not assigned to, or a second, different verdict."""


# -- sampling -----------------------------------------------------------------------------


def sample_probability(verify_fraction: float, trust_class: str, passed_checks: int) -> float:
    """The chance that a kept report is replayed (module docstring); an unknown class counts as a volunteer's."""
    factor = CLASS_FACTOR.get(trust_class, CLASS_FACTOR[VOLUNTEER])
    return min(1.0, verify_fraction * factor * (1.0 + NEW_WORKER_BOOST / (1 + max(passed_checks, 0))))


@dataclass(frozen=True)
class Sampler:
    """Draws which kept reports are checked; `draw` returns a number in [0, 1).

    The default draw is the operating system's random source: a worker that could predict
    the draws would cheat exactly in the rounds nobody checks. Tests inject their own.
    """

    verify_fraction: float
    draw: Callable[[], float] = field(default=random.SystemRandom().random)

    def sampled(self, trust_class: str, passed_checks: int) -> bool:
        return self.draw() < sample_probability(self.verify_fraction, trust_class, passed_checks)


# -- anomalies in witnesses ---------------------------------------------------------------


@dataclass(frozen=True)
class ReducerWitnesses:
    """The witnesses one kept report carries, and the peer id its reducer averaged with."""

    reducer_peer_id: str
    witnesses: Sequence[pb.SliceWitness]


def _not_finite(witness: pb.SliceWitness) -> str | None:
    if not witness.finite or not math.isfinite(witness.norm):
        return "witness: not finite (it sent NaN or infinity)"
    return None


def _norm_off(witness: pb.SliceWitness) -> str | None:
    """Its norm outside [median / 3, 3 x median]; None also when the median says nothing (zero, not finite)."""
    median = witness.median_norm
    if not math.isfinite(median) or median <= 0:
        return None
    ratio = witness.norm / median
    if ratio > NORM_SPREAD:
        return f"witness: norm {ratio:.0f}x the median"
    if ratio == 0:
        return f"witness: norm 0 where the median is {median:.3g}"
    if ratio < 1 / NORM_SPREAD:
        return f"witness: norm 1/{1 / ratio:.0f} of the median"
    return None


def _against_aggregate(witness: pb.SliceWitness) -> str | None:
    if witness.cosine_to_aggregate < 0:
        return f"witness: cosine {witness.cosine_to_aggregate:.2f} to its slice's aggregate"
    return None


def slice_anomalies(witnesses: Sequence[pb.SliceWitness]) -> dict[str, str]:
    """Sender peer id -> what is off, among the witnesses of one reducer's one slice."""
    senders = {w.sender_peer_id for w in witnesses}
    found: dict[str, str] = {}
    for witness in witnesses:
        reason = _not_finite(witness) or _norm_off(witness)
        if reason is None and len(senders) >= MIN_SENDERS:
            reason = _against_aggregate(witness)
        if reason is not None:
            found.setdefault(witness.sender_peer_id, reason)
    if len(senders) < MIN_SENDERS:
        # With two senders the median is their mean: the honest one looks off when the other is huge.
        off = [reason for w in witnesses if _not_finite(w) is None and (reason := _norm_off(w))]
        for sender in senders if off else ():
            found.setdefault(sender, f"{off[0]} in a slice of {len(senders)} senders (either may be off)")
    return found


def anomalies(reports: Iterable[ReducerWitnesses]) -> dict[str, str]:
    """Sender peer id -> the first anomaly any reducer witnessed of it; a reducer's witness about itself is ignored."""
    found: dict[str, str] = {}
    for report in reports:
        slices: dict[tuple[int, int], list[pb.SliceWitness]] = defaultdict(list)
        for witness in report.witnesses:
            if witness.sender_peer_id:
                slices[(witness.start, witness.end)].append(witness)
        for part in slices.values():
            for sender, reason in slice_anomalies(part).items():
                if sender != report.reducer_peer_id:
                    found.setdefault(sender, reason)
    return found


# -- opening checks -----------------------------------------------------------------------


def evidence_of(row: FiledReport) -> pb.CompleteRoundRequest:
    """The claim and witnesses a report was filed with (empty when it carried neither)."""
    return pb.CompleteRoundRequest.FromString(row.evidence or b"")


def open_checks(session: Session, round_number: int, sampler: Sampler, now: float,
                candidates: Sequence[FiledReport]) -> list[Check]:
    """Checks of a decided round: each candidate (a newly kept report) sampled, every sender a witness shows off.

    Anomalies are read from all the round's kept reports, so a report kept late is judged by
    its group's witnesses too; a worker already checked in the round is not checked twice.
    """
    kept = session.scalars(select(FiledReport).where(FiledReport.round == round_number,
                                                     FiledReport.outcome == "kept")).all()
    evidence = {row.id: evidence_of(row) for row in kept}
    checked = set(session.scalars(select(Check.worker_id).where(Check.round == round_number)))
    opened: list[Check] = []

    def open_check(row: FiledReport, trigger: str) -> None:
        if row.worker_id in checked or not evidence[row.id].HasField("claim"):
            return
        checked.add(row.worker_id)
        check = Check(worker_id=row.worker_id, round=round_number, status="pending", trigger=trigger[:256],
                      created_at=now)
        session.add(check)
        opened.append(check)

    by_peer: dict[str, list[FiledReport]] = defaultdict(list)
    for row in kept:
        if row.peer_id:
            by_peer[row.peer_id].append(row)
    found = anomalies(ReducerWitnesses(row.peer_id, evidence[row.id].witnesses) for row in kept)
    for peer_id, reason in sorted(found.items()):
        for row in by_peer.get(peer_id, ()):
            open_check(row, f"anomaly: {reason}")
    for row in candidates:
        worker = session.get(Worker, row.worker_id)
        if row.id in evidence and sampler.sampled(worker.trust_class, worker.passed_checks):
            open_check(row, "sampled")
    session.flush()
    return opened


# -- validators ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Assignment:
    """What a validator needs to replay one kept report (sent as a CheckAssignment)."""

    check: Check
    leases: list[tuple[Lease, Shard]]     # the report's leases, as granted
    usage: list[tuple[int, int]]          # (lease id, tokens trained: a prefix)
    claim: pb.WorkClaim
    witnesses: list[pb.SliceWitness]      # what other reducers saw of its pseudo-gradient
    witness_classes: list[str]            # each witness's reducer's trust class, in order
    start_params_digest: str              # the parameters the round started from ("" for round 0)


def take_check(session: Session, validator_id: str, now: float, reassign_after: float) -> Assignment | None:
    """The check this validator holds, else the oldest open one not about itself; None when there is none.

    Open: pending, or assigned longer than `reassign_after` ago (its validator went quiet). A
    check put back after an inconclusive verdict goes to another validator than the one that gave it.
    A check whose report a rewind deleted waits, unoffered, for the worker's report of the round
    to be kept again (coordinator/rewind.py).
    """
    validator = session.get(Worker, validator_id, with_for_update=True)
    _require_validator(validator)
    check = session.scalar(select(Check).where(Check.status == "assigned", Check.validator_id == validator_id,
                                               _report_kept()).order_by(Check.id).limit(1))
    if check is None:
        check = session.scalar(
            select(Check).where(Check.worker_id != validator_id, _report_kept(), or_(
                and_(Check.status == "pending", or_(Check.validator_id.is_(None), Check.validator_id != validator_id)),
                and_(Check.status == "assigned", Check.assigned_at < now - reassign_after),
            )).order_by(Check.id).limit(1).with_for_update(skip_locked=True)
        )
        if check is None:
            return None
        check.status, check.validator_id, check.assigned_at = "assigned", validator_id, now
    return _assignment(session, check)


def _report_kept() -> ColumnElement[bool]:
    """The check's report (its worker's, of its round) is kept: there is something to replay."""
    return select(FiledReport.id).where(FiledReport.round == Check.round, FiledReport.worker_id == Check.worker_id,
                                        FiledReport.outcome == "kept").exists()


def _kept_report(session: Session, check: Check) -> FiledReport:
    return session.scalars(select(FiledReport).where(FiledReport.round == check.round,
                                                     FiledReport.worker_id == check.worker_id,
                                                     FiledReport.outcome == "kept")).one()


def _require_validator(worker: Worker) -> None:
    if worker.trust_class not in CERTIFIED_CLASSES:
        raise NotAValidator(
            f"worker {worker.id[:12]} is a {worker.trust_class}: validators need an institution certificate "
            f"(trust class {' or '.join(CERTIFIED_CLASSES)}; join with `essaim worker join --certificate`)")
    if worker.quarantined_at is not None:
        raise NotAValidator(f"worker {worker.id[:12]} is quarantined since round {worker.quarantine_round}: "
                            "a quarantined worker validates nothing")


def _assignment(session: Session, check: Check) -> Assignment:
    report = _kept_report(session, check)
    usage = list(RoundReport.from_json(report.report).leases)
    leases = []
    for lease_id, _ in usage:
        lease = session.get(Lease, lease_id)
        leases.append((lease, session.get(Shard, lease.shard_id)))
    witnesses, classes = _witnesses_about(session, report)
    start = session.get(Round, check.round - 1) if check.round > 0 else None
    return Assignment(check, leases, usage, evidence_of(report).claim, witnesses, classes,
                      start.params_digest if start is not None else "")


def _witnesses_about(session: Session, report: FiledReport) -> tuple[list[pb.SliceWitness], list[str]]:
    """What the other kept reports of its round witnessed of this report's peer, with each reducer's trust class.

    A quarantined reducer's witnesses are left out: a worker convicted of lying convicts nobody.
    """
    if not report.peer_id:
        return [], []
    rows = session.execute(
        select(FiledReport, Worker.trust_class).join(Worker, Worker.id == FiledReport.worker_id)
        .where(FiledReport.round == report.round, FiledReport.outcome == "kept",
               FiledReport.worker_id != report.worker_id, Worker.quarantined_at.is_(None)).order_by(FiledReport.id)
    ).all()
    witnesses, classes = [], []
    for row, trust_class in rows:
        for witness in evidence_of(row).witnesses:
            if witness.sender_peer_id == report.peer_id:
                witnesses.append(witness)
                classes.append(trust_class)
    return witnesses, classes


# -- verdicts -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    check_id: int
    outcome: str          # passed | failed (also the check's status then) | inconclusive
    reason: str = ""
    exact: bool = False   # the replay's pseudo-gradient digest matched the claim's
    cosine: float = 0.0
    norm_ratio: float = 0.0


def submit_verdict(session: Session, validator_id: str, verdict: Verdict, now: float) -> Check:
    """Apply a verdict from the validator the check is assigned to; the same verdict sent again changes nothing."""
    check = session.get(Check, verdict.check_id, with_for_update=True)
    if check is None:
        raise UnknownCheck(f"no check {verdict.check_id}: take one with TakeCheck")
    validator = session.get(Worker, validator_id)
    if validator.quarantined_at is not None:
        raise VerdictRefused(f"worker {validator_id[:12]} is quarantined since round {validator.quarantine_round}: "
                             "its verdicts are not taken")
    if _given_already(check, validator_id, verdict.outcome):
        return check
    if check.status != "assigned" or check.validator_id != validator_id:
        raise VerdictRefused(_why_not_yours(check, validator_id))
    check.reason, check.exact, check.cosine, check.norm_ratio = (verdict.reason, verdict.exact, verdict.cosine,
                                                                 verdict.norm_ratio)
    if verdict.outcome == "inconclusive":
        check.inconclusive += 1
        if check.inconclusive == 1:  # another validator may have the start state: once more
            check.status, check.assigned_at = "pending", None
        else:
            check.status, check.decided_at = "inconclusive", now
        return check
    check.status, check.decided_at = verdict.outcome, now
    worker = session.get(Worker, check.worker_id, with_for_update=True)
    if check.status == "passed":
        credit(session, check.worker_id, check.round, "verified")
        worker.passed_checks += 1
    else:
        credit(session, check.worker_id, check.round, "rejected")
        quarantine(session, worker, check, now)
    return check


def _given_already(check: Check, validator_id: str, outcome: str) -> bool:
    """The same verdict, resent by the validator that gave it (its reply was lost)."""
    if check.validator_id != validator_id:
        return False
    if outcome == "inconclusive":
        return check.inconclusive > 0 and check.status in ("pending", "inconclusive")
    return check.status == outcome


def _why_not_yours(check: Check, validator_id: str) -> str:
    if check.status in ("passed", "failed", "inconclusive"):
        return f"check {check.id} is decided already ({check.status}): a check takes one verdict"
    if check.status == "assigned":
        return (f"check {check.id} is assigned to another validator, not to worker {validator_id[:12]} (a check "
                "assigned too long ago is given to another validator): take a new check with TakeCheck")
    return f"check {check.id} is not assigned to worker {validator_id[:12]}: take a check with TakeCheck first"


def credit(session: Session, worker_id: str, round_number: int, state: str) -> None:
    """What a check found, on every lineage record of the worker's round."""
    session.execute(update(LineageRecord).where(LineageRecord.worker_id == worker_id,
                                                LineageRecord.round == round_number).values(verification=state))


def quarantine(session: Session, worker: Worker, check: Check, now: float) -> None:
    """No more leases or credit for the worker: its leases out back to the pool, its undecided reports dropped.

    Its tokens already in kept rounds stay in the model (and in the books): only the checked
    round's are credited "rejected". A second failed check keeps the first one's record.
    """
    if worker.quarantined_at is None:
        worker.quarantined_at, worker.quarantine_round, worker.quarantine_check = now, check.round, check.id
        worker.quarantine_reason = check.reason or "its replay disagreed with its claim (no reason given)"
    for lease in session.scalars(select(Lease).where(Lease.worker_id == worker.id, Lease.state.in_(HELD))
                                 .with_for_update()).all():
        return_to_pool(session, lease, "released", now)
    for row in session.scalars(select(FiledReport).where(FiledReport.worker_id == worker.id,
                                                         FiledReport.outcome == "pending")).all():
        row.outcome = "quarantined"
    for held in session.scalars(select(Check).where(Check.validator_id == worker.id,
                                                    Check.status == "assigned")).all():
        held.status, held.assigned_at = "pending", None  # a convicted validator's checks go to the others now
        held.validator_id = None


def refuse_if_quarantined(session: Session, worker_id: str) -> Worker:
    """The worker's row; Quarantined if a check of it failed.

    Not locked: a report that locked its worker's row first, then the round's filed reports,
    then (recording) other workers' rows, deadlocks with another report doing the same
    (PostgreSQL breaks each deadlock after a second). A verdict given while a report is on its
    way is caught later instead: the round's decision drops a quarantined worker's filed report
    (RoundBook._drop_quarantined). One process serialises both anyway (the scheduler's lock).
    """
    worker = session.get(Worker, worker_id)
    if worker.quarantined_at is not None:
        raise Quarantined(worker)
    return worker



# -- a maintainers' decision: train again what no check verified ----------------------------


def retrain_unverified(session: Session, worker_ids: Iterable[str], now: float) -> int:
    """Return the tokens of the named workers' unverified and rejected lineage to the pool; the tokens returned.

    A ledger item decides it ("retrain", governance/state.py), typically for a quarantined worker
    whose earlier rounds nobody checked. The tokens are in the weights already (their rounds were
    kept), so this does not undo them: it has honest workers train the same data again, as a
    rewind does (coordinator/rewind.py): the lease is marked rewound, the range goes back to the
    pool, and the lineage record stays for the audit trail with the time it was returned.
    Idempotent: a returned record is never returned twice.
    """
    workers = sorted(set(worker_ids))
    if not workers:
        return 0
    records = session.scalars(select(LineageRecord).where(
        LineageRecord.worker_id.in_(workers), LineageRecord.verification != "verified",
        LineageRecord.rewound_at.is_(None)).with_for_update()).all()
    return sum(untrain(session, record, now) for record in records)
