"""Round reports: which model a round keeps, and recording exactly the tokens that went into it.

The rule (docs/ARCHITECTURE.md, "Rounds"):
- The open round is one past the last decided round. A report is filed only for the
  open round, and only on leases granted to its worker for that round: a report for
  another round, or on another round's lease, is refused and changes nothing.
- A filed report stakes its leases' tokens on its parameters' digest. The round is decided
  for the digest that holds more tokens than the runner-up could still reach: more than
  the runner-up's stake plus every token of the round still out on granted leases, plus a
  round's worth of tokens for every live worker that holds no lease of the round yet (it may
  still lease and report). So a group holding most of the round's tokens wins as soon as its
  reports are in, and a worker reporting first on a small lease, even before anyone else has
  leased, decides nothing. When nothing is out any more, the
  biggest stake wins (on a tie, the smallest digest: arbitrary, but the same everywhere).
- Leases still out stop counting `decision_seconds` after the leading digest's first report,
  if that digest is a group's (two workers or more, by their reports and signed member
  statements) holding more than every other report: a worker that holds leases and never
  reports (a hoarder, or one that died while heartbeating) cannot hold a round open for
  long. A lone reporter never wins this way, however long it waits.
- At the decision, the winning reports' leases are recorded (lineage, contributions); so
  are the leases of every member their signed member statements name that did not report
  itself (its report was lost, or it died after averaging): the group vouches for it. The
  other reports are not kept: their leases go back to the pool.
- A late report (its round already decided) is recorded if it carries the kept digest on
  leases still granted to it (a member whose report came after the decision); otherwise it is
  answered "not kept" and changes nothing.
Until its round is decided a report is answered "pending" and sent again.

Checked work (coordinator/verification.py): a report is filed with its claim and witnesses and
the peer id its worker leased with; once kept (at the decision, or late) the round book hands it
to `on_kept`, which opens the checks a validator replays. A quarantined worker's reports are
refused before they reach the round book, and a group's statement vouching for one records nothing.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from coordinator import report_sql
from coordinator.evaluations import record_evaluation
from coordinator.leases import LeaseError, check_usage, complete, own_lease, return_to_pool
from coordinator.store import (
    Contribution, FiledReport, Lease, LineageRecord, Round, Worker, flushed_connection, insert_if_absent,
)
from model.eval_figures import EvalFigure

log = logging.getLogger("essaim.coordinator")

Usage = tuple[tuple[int, int], ...]  # (lease id, tokens consumed: a prefix of the lease's range)


@dataclass(frozen=True)
class Member:
    """A group member's signed word (protocol/credentials.py) of what it trained in the round."""

    worker_id: str
    leases: Usage
    loss: float = 0.0


@dataclass(frozen=True)
class RoundReport:
    """A worker's finished round: the leases it trained on, how averaging went, and who averaged with it."""

    round: int
    leases: Usage
    loss: float
    pseudo_gradient_digest: str
    params_digest: str
    group_size: int
    bytes_sent: int = 0
    inner_seconds: float = 0.0
    wall_seconds: float = 0.0
    members: tuple[Member, ...] = field(default=())
    evaluation: tuple[EvalFigure, ...] = field(default=())  # held-out figures of params_digest (coordinator/evaluations.py)
    # What the round cost the reporter's device (worker/energy.py); reports filed before energy was reported have none.
    energy_joules: float = 0.0
    energy_method: str = ""
    # Its claim and witnesses, a CompleteRoundRequest holding only those (protobuf): kept for the
    # validators in the filed report's own column, not in its JSON.
    evidence: bytes = field(default=b"", repr=False)

    def to_json(self) -> str:
        fields = asdict(self)
        del fields["evidence"]
        return json.dumps(fields, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RoundReport":
        fields = json.loads(text)
        fields["leases"] = tuple(map(tuple, fields["leases"]))
        fields["members"] = tuple(Member(m["worker_id"], tuple(map(tuple, m["leases"])), m["loss"])
                                  for m in fields["members"])
        fields["evaluation"] = tuple(EvalFigure(**figure) for figure in fields.get("evaluation", ()))
        return cls(**fields)


@dataclass(frozen=True)
class RoundRecorded:
    accepted: bool            # the report's tokens are recorded in the round's kept model
    round_params_digest: str  # the parameters the round kept ("" while pending)
    lineage_ids: list[int]    # one per lease, in report order (accepted only)
    lineage_head: int         # the newest lineage record id
    pending: bool = False     # the round is not decided yet: send the same report again


def winner(stakes: dict[str, int], outstanding: int, group_waited: set[str] = frozenset()) -> str | None:
    """The digest the round keeps, or None while another could still overtake it (module docstring).

    `group_waited`: digests held by a group that has waited out the decision window.
    """
    if not stakes:
        return None
    ranked = sorted(stakes.items(), key=lambda item: (-item[1], item[0]))
    best_digest, best = ranked[0]
    runner_up = ranked[1][1] if len(ranked) > 1 else 0
    if best > runner_up + outstanding or outstanding <= 0:
        return best_digest
    if best_digest in group_waited and best > runner_up:
        return best_digest
    return None


def lineage_head(session: Session) -> int:
    return flushed_connection(session).execute(report_sql.LINEAGE_HEAD).scalar() or 0


# Called with (session, round, its newly kept filed reports, now) once they are recorded.
OnKept = Callable[[Session, int, Sequence[FiledReport], float], object]


class RoundBook:
    def __init__(self, config_version: Callable[[int], str], decision_seconds: float = float("inf"),
                 idle_stake: int = 0, live_seconds: float = 15.0, on_kept: OnKept | None = None) -> None:
        self._config_version = config_version  # the config in force at a round, named in its lineage
        self._decision_seconds = decision_seconds
        self._idle_stake = idle_stake      # what a live worker without a lease of the round may still stake
        self._live_seconds = live_seconds  # heard from this recently: live
        self._on_kept = on_kept            # opens the checks of kept reports (coordinator/verification.py)

    def report(self, session: Session, worker_id: str, report: RoundReport, open_round: int, now: float) -> RoundRecorded:
        """File, decide and answer a report (module docstring); LeaseError for a refused one."""
        replayed = self._recorded_before(session, worker_id, report, now)
        if replayed is not None:
            return replayed
        filed_id = flushed_connection(session).execute(report_sql.FILED_REPORT, {"round": report.round,
                                                                          "worker": worker_id}).scalar()
        if filed_id is not None:  # sent again while pending, or after the decision
            filed = session.get(FiledReport, filed_id)
            known = RoundReport.from_json(filed.report)
            if (known.params_digest, known.leases) != (report.params_digest, report.leases):
                raise LeaseError(f"round {report.round} was already reported with other parameters or leases "
                                 "than this report's: acquire new leases")
            if filed.outcome == "pending":
                self.decide(session, report.round, now)
            return self._answer(session, filed, known)
        if report.round > open_round:
            raise LeaseError(f"round {report.round} is not open: the run is at round {open_round} "
                             "(release these leases and load the swarm's state)")
        leases = [own_lease(session, worker_id, lease_id) for lease_id, _ in report.leases]
        for lease, (_, tokens) in zip(leases, report.leases):
            if lease.round != report.round:
                raise LeaseError(f"lease {lease.id} was granted for round {lease.round}, not round {report.round}: "
                                 "a round is reported on its own leases only")
            check_usage(lease, tokens)
        if report.round < open_round:
            return self._late(session, worker_id, report, now)
        filed = self._file(session, worker_id, report, now, "pending")
        for lease in leases:
            lease.state = "reported"
        session.flush()
        self.decide(session, report.round, now)
        return self._answer(session, filed, report)

    def decide(self, session: Session, round_number: int, now: float) -> bool:
        """Decide the round if its winner is settled; True if it was decided now."""
        if not self._may_be_settled(session, round_number, now):
            return False
        if not report_sql.take_decision(flushed_connection(session), round_number):
            return False  # another transaction is deciding it: a report left pending is sent again, and answered
        filed = session.scalars(select(FiledReport).where(FiledReport.round == round_number,
                                                          FiledReport.outcome == "pending")
                                .order_by(FiledReport.received_at, FiledReport.id).with_for_update()).all()
        filed = self._drop_quarantined(session, filed, now)
        if not filed:
            return False
        reports = {row.id: RoundReport.from_json(row.report) for row in filed}  # parsed once per decision
        stakes: dict[str, int] = defaultdict(int)
        first_report: dict[str, float] = {}
        workers: dict[str, set[str]] = defaultdict(set)  # per digest: its reporters and the members they vouch for
        for row in filed:
            stakes[row.params_digest] += row.held_tokens
            first_report.setdefault(row.params_digest, row.received_at)
            workers[row.params_digest].add(row.worker_id)
            workers[row.params_digest].update(m.worker_id for m in reports[row.id].members)
        outstanding = self._outstanding(session, round_number, now, stakes)
        waited = {digest for digest, since in first_report.items()
                  if len(workers[digest]) >= 2 and now - since >= self._decision_seconds}
        digest = winner(stakes, outstanding, waited)
        if digest is None:
            return False
        round_row = self._round_row(session, round_number, digest, filed[0].received_at)
        kept = [row for row in filed if row.params_digest == round_row.params_digest]
        recorded: set[str] = set()
        for row in kept:
            self._record(session, row.worker_id, reports[row.id], round_row, now)
            record_evaluation(session, row.worker_id, reports[row.id], now)
            row.outcome = "kept"
            recorded.add(row.worker_id)
        for row in kept:
            report = reports[row.id]
            for member in report.members:
                if member.worker_id not in recorded and self._vouch(session, member, report, round_row, now):
                    recorded.add(member.worker_id)
        if self._on_kept is not None:
            self._on_kept(session, round_number, kept, now)
        for row in filed:
            if row.outcome == "pending":
                row.outcome = "not_kept"
                for lease_id, _ in reports[row.id].leases:
                    lease = session.get(Lease, lease_id)
                    if lease.state == "reported":  # not vouched for by the kept group
                        return_to_pool(session, lease, "released", now)
        log.info("round %d decided: parameters %s, held by %d report(s) and %d vouched member(s); %d not kept",
                 round_number, round_row.params_digest[:12], len(kept), len(recorded) - len(kept),
                 len(filed) - len(kept))
        return True

    # -- internals -----------------------------------------------------------------------

    def _may_be_settled(self, session: Session, round_number: int, now: float) -> bool:
        """False when the round's pending reports cannot have a winner yet: what every report and every second
        asks, answered from per-digest sums (one index holds them). Reading, locking and parsing every pending
        report, as the decision does, would cost each report of a busy round as much as all its reports so far.

        It errs one way only, so that where it answers False the decision would have found no winner either:
        any digest old enough is taken for a group that waited (the decision checks the group). The one
        exception, a delay: a report whose worker another process quarantined a moment ago still counts
        here, until a decision drops it (a verdict drops the reports it quarantines itself).
        """
        rows = flushed_connection(session).execute(report_sql.PENDING_STAKES, {"round": round_number}).all()
        if not rows:
            return False
        stakes = {digest: int(tokens) for digest, tokens, _ in rows}
        waited = {digest for digest, _, since in rows if now - since >= self._decision_seconds}
        return winner(stakes, self._outstanding(session, round_number, now, stakes), waited) is not None

    def _outstanding(self, session: Session, round_number: int, now: float, stakes: dict[str, int]) -> int:
        """Tokens that may still be staked in the round: on granted leases, and what idle live workers may
        lease, counted only as far as they decide `winner`: once they outweigh the leader's margin, no more."""
        granted = flushed_connection(session).execute(report_sql.GRANTED_TOKENS, {"round": round_number}).scalar()
        ranked = sorted(stakes.values(), reverse=True)
        margin = ranked[0] - (ranked[1] if len(ranked) > 1 else 0) - granted
        if not self._idle_stake or margin < 0:
            return granted  # (margin < 0: granted leases hold the round open already)
        enough = margin // self._idle_stake + 1  # this many idle workers hold the round open
        return granted + self._idle_stake * self._idle_workers(session, round_number, now, enough)

    def _idle_workers(self, session: Session, round_number: int, now: float, at_most: int) -> int:
        """Live workers at the round with no lease and no report in it, each of which may still lease and
        report; counted up to `at_most` (a busy swarm's every report would otherwise scan every worker).

        Not idle here: one whose heartbeats say it is behind the round (catching up, it cannot train
        the round before the swarm has decided the one before, and peers may have moved on already),
        and one that holds leases of a later round (overlapped averaging: it has moved on itself).
        """
        return flushed_connection(session).execute(report_sql.IDLE_WORKERS, {
            "live_since": now - self._live_seconds, "round": round_number, "at_most": at_most}).scalar() or 0

    @staticmethod
    def _drop_quarantined(session: Session, filed: list[FiledReport], now: float) -> list[FiledReport]:
        """The filed reports whose workers are not quarantined; the others' are dropped, their leases back in the pool.

        A verdict drops them when it quarantines (coordinator/verification.py): this is for a report
        filed by another coordinator process while that verdict was being given.
        """
        if not filed:
            return filed
        quarantined = set(session.scalars(select(Worker.id).where(
            Worker.id.in_(sorted({row.worker_id for row in filed})), Worker.quarantined_at.is_not(None))))
        for row in filed:
            if row.worker_id in quarantined:
                row.outcome = "quarantined"
                for lease_id, _ in RoundReport.from_json(row.report).leases:
                    lease = session.get(Lease, lease_id)
                    if lease.state == "reported":
                        return_to_pool(session, lease, "released", now)
        return [row for row in filed if row.worker_id not in quarantined]

    @staticmethod
    def _file(session: Session, worker_id: str, report: RoundReport, now: float, outcome: str) -> FiledReport:
        """The report as filed: its stake, its JSON, and what a check of it needs (peer id, claim, witnesses)."""
        held = sum(lease.end - lease.start for lease in (session.get(Lease, i) for i, _ in report.leases))
        peer_id = flushed_connection(session).execute(report_sql.PEER_ID, {"worker": worker_id}).scalar()
        filed = FiledReport(round=report.round, worker_id=worker_id, params_digest=report.params_digest,
                            held_tokens=held, report=report.to_json(), received_at=now, outcome=outcome,
                            peer_id=peer_id, evidence=report.evidence or None)
        session.add(filed)
        return filed

    def _kept_late(self, session: Session, worker_id: str, report: RoundReport, now: float) -> None:
        """File a report recorded after its round's decision as kept, so that it can be checked like the others."""
        record_evaluation(session, worker_id, report, now)
        known = session.scalar(select(FiledReport.id).where(FiledReport.round == report.round,
                                                            FiledReport.worker_id == worker_id))
        if known is not None:
            return
        filed = self._file(session, worker_id, report, now, "kept")
        session.flush()
        if self._on_kept is not None:
            self._on_kept(session, report.round, [filed], now)

    def _answer(self, session: Session, filed: FiledReport, report: RoundReport) -> RoundRecorded:
        head = lineage_head(session)
        if filed.outcome == "pending":
            return RoundRecorded(False, "", [], head, pending=True)
        kept_digest = session.get(Round, filed.round).params_digest
        if filed.outcome == "not_kept":
            return RoundRecorded(False, kept_digest, [], head)
        return RoundRecorded(True, kept_digest, self._lineage_ids(session, report), head)

    def _late(self, session: Session, worker_id: str, report: RoundReport, now: float) -> RoundRecorded:
        round_row = session.get(Round, report.round)
        if round_row is None or round_row.params_digest != report.params_digest:
            kept = round_row.params_digest if round_row is not None else ""
            return RoundRecorded(False, kept, [], lineage_head(session))
        self._record(session, worker_id, report, round_row, now)
        self._kept_late(session, worker_id, report, now)
        session.flush()
        return RoundRecorded(True, round_row.params_digest, self._lineage_ids(session, report), lineage_head(session))

    def _record(self, session: Session, worker_id: str, report: RoundReport, round_row: Round, now: float,
                bytes_sent: int | None = None) -> None:
        """The report's leases become trained tokens of the round's model: lineage, contribution, round totals."""
        worker = session.get(Worker, worker_id)
        config_version = self._config_version(report.round)
        round_tokens = sum(tokens for _, tokens in report.leases)
        for lease_id, tokens in report.leases:
            lease = own_lease(session, worker_id, lease_id, ("granted", "reported"))
            check_usage(lease, tokens)
            complete(session, lease, tokens, now)
            session.add(LineageRecord(
                round=report.round, worker_id=worker.id, institution=worker.institution, lease_id=lease.id,
                shard_id=lease.shard_id, epoch=lease.epoch, start=lease.start, end=lease.start + tokens,
                loss=report.loss, pseudo_gradient_digest=report.pseudo_gradient_digest,
                config_version=config_version, device=worker.device, precision=worker.precision, created_at=now,
                energy_joules=report.energy_joules * tokens / max(round_tokens, 1),  # its share of the round's, by tokens
            ))
        tokens = round_tokens
        session.add(Contribution(
            round=report.round, worker_id=worker_id, tokens=tokens, loss=report.loss, group_size=report.group_size,
            bytes_sent=report.bytes_sent if bytes_sent is None else bytes_sent, inner_seconds=report.inner_seconds,
            wall_seconds=report.wall_seconds, params_digest=round_row.params_digest, created_at=now,
            energy_joules=report.energy_joules, energy_method=report.energy_method,
        ))
        round_row.reports += 1
        round_row.tokens += tokens
        round_row.loss_sum += report.loss
        round_row.max_group_size = max(round_row.max_group_size, report.group_size)
        worker.last_round, worker.last_loss, worker.last_seen = report.round, report.loss, max(worker.last_seen, now)
        worker.failures, worker.backoff_until = 0, 0.0  # a recorded round ends any failure streak

    def _vouch(self, session: Session, member: Member, by: RoundReport, round_row: Round, now: float) -> bool:
        """Record a member that did not report itself, on its own signed usage; False if its leases do not fit."""
        worker = session.get(Worker, member.worker_id)
        if worker is None or worker.quarantined_at is not None:
            log.warning("round %d: a member statement vouches for worker %s, which is quarantined or unknown: "
                        "not recorded", round_row.number, member.worker_id[:8])
            return False
        for lease_id, tokens in member.leases:
            lease = session.get(Lease, lease_id)
            if (lease is None or lease.worker_id != member.worker_id or lease.round != round_row.number
                    or lease.state not in ("granted", "reported") or not 0 < tokens <= lease.end - lease.start):
                log.warning("round %d: worker %s is vouched for on lease %d, which it does not hold for the round: "
                            "not recorded", round_row.number, member.worker_id[:8], lease_id)
                return False
        # A member statement says what the member trained, not what it cost: its energy is unknown, so
        # recorded as none (0 joules, no method), as its bytes sent are, rather than guessed from its peers'.
        vouched = RoundReport(round=by.round, leases=member.leases, loss=member.loss,
                              pseudo_gradient_digest=by.pseudo_gradient_digest, params_digest=by.params_digest,
                              group_size=by.group_size)
        self._record(session, member.worker_id, vouched, round_row, now, bytes_sent=0)
        return True

    @staticmethod
    def _round_row(session: Session, number: int, digest: str, first_report_at: float) -> Round:
        """The decided round's row, locked; insert-if-absent, so two processes deciding at once agree on one."""
        session.execute(
            insert_if_absent(session, Round, ["number"])
            .values(number=number, first_report_at=first_report_at, reports=0, tokens=0, loss_sum=0.0,
                    max_group_size=0, params_digest=digest)
        )
        return session.get(Round, number, with_for_update=True, populate_existing=True)

    @staticmethod
    def _lineage_ids(session: Session, report: RoundReport) -> list[int]:
        ids = dict(session.execute(select(LineageRecord.lease_id, LineageRecord.id)
                                   .where(LineageRecord.lease_id.in_([i for i, _ in report.leases]))).all())
        return [ids[lease_id] for lease_id, _ in report.leases]

    def _recorded_before(self, session: Session, worker_id: str, report: RoundReport,
                         now: float) -> RoundRecorded | None:
        """The answer already given, when this report was recorded before and its reply lost (a retry).

        A coordinator killed after committing a report but before replying sees the same
        report again once restarted: it must answer as the first time, not refuse it. So
        does a member whose report arrives after its group vouched for it.
        """
        completed = flushed_connection(session).execute(report_sql.COMPLETED_LEASES, {
            "ids": [lease_id for lease_id, _ in report.leases], "worker": worker_id, "round": report.round}).scalar()
        if not completed:  # a report seen for the first time: nothing recorded yet
            return None
        leases = [session.get(Lease, lease_id) for lease_id, _ in report.leases]
        for (lease_id, tokens), lease in zip(report.leases, leases):
            if lease is None or (lease.state, lease.worker_id, lease.round, lease.tokens_consumed) != (
                "completed", worker_id, report.round, tokens
            ):
                raise LeaseError(
                    f"round {report.round} was already reported with other leases or token counts than this "
                    f"report's (lease {lease_id}): acquire new leases"
                )
        kept = session.get(Round, report.round).params_digest
        if kept != report.params_digest:  # vouched for by its group, then reported other parameters
            return RoundRecorded(False, kept, [], lineage_head(session))
        self._complete_vouched(session, worker_id, report)
        self._kept_late(session, worker_id, report, now)  # vouched for, then its own report: checkable now
        return RoundRecorded(True, kept, self._lineage_ids(session, report), lineage_head(session))

    @staticmethod
    def _complete_vouched(session: Session, worker_id: str, report: RoundReport) -> None:
        """A member recorded from its group's statement, whose own report arrives now: what only that report
        says (bytes sent, times, energy) fills in its contribution and its lineage records' shares of the
        energy. A retry of a report recorded before writes the same figures again."""
        contribution = session.scalar(select(Contribution).where(Contribution.round == report.round,
                                                                 Contribution.worker_id == worker_id))
        if contribution is None:
            return
        contribution.bytes_sent, contribution.energy_joules = report.bytes_sent, report.energy_joules
        contribution.inner_seconds, contribution.wall_seconds = report.inner_seconds, report.wall_seconds
        contribution.energy_method = report.energy_method
        tokens = sum(used for _, used in report.leases)
        for lease_id, used in report.leases:
            session.execute(update(LineageRecord).where(LineageRecord.lease_id == lease_id)
                            .values(energy_joules=report.energy_joules * used / max(tokens, 1)))
