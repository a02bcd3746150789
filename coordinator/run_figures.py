"""The run's figures for the dashboard and /metrics: one cached reading of the database that both share.

Public and read-only, like `essaim status` (coordinator/status.py): rounds, live workers by class
and device, tokens trained by source, language, institution and class, held-out evaluations,
energy. Anyone may open the dashboard and any Prometheus may scrape, so no request reads the
database itself: a reading is kept for at least `max_age_seconds` and shared by every caller, and
one that took t seconds is kept at least MAX_SHARE_OF_TIME times t, so however large the database
grows, these views cost it at most a twentieth of one core. The epoch's progress scans every token
range (half a second at a million ranges, where `essaim status` reads the same), so it is kept
EPOCH_SHARE_OF_TIME times as long as its reading took: a hundred seconds at a million ranges,
which an epoch's ETA, hours away, does not notice; a second on a small corpus.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from coordinator.energy import JOULES_PER_KWH
from coordinator.status import oldest_open_epoch  # the same epoch as `essaim status` shows
from coordinator.store import Contribution, Evaluation, Lease, LineageRecord, Round, Shard, Source, Worker

DEFAULT_MAX_AGE_SECONDS = 1.0
MAX_SHARE_OF_TIME = 20
EPOCH_SHARE_OF_TIME = 200


@dataclass(frozen=True)
class RoundFigures:
    number: int
    reports: int
    tokens: int
    mean_loss: float
    group_size: int            # the largest averaging group of its kept reports
    wall_seconds: float | None  # from the previous round's first report to this one's; None: no previous round
    bytes_averaged: int
    energy_joules: float


@dataclass(frozen=True)
class TrainedTokens:
    """Lineage tokens (rewound ones excepted) of one source, language, institution, class and check outcome."""

    source: str
    language: str
    institution: str
    trust_class: str
    verification: str  # unverified | verified | rejected
    tokens: int


@dataclass(frozen=True)
class InstitutionEnergy:
    institution: str
    energy_joules: float
    emissions_grams: float  # energy x the grid intensity its workers declared (0 where none did)


@dataclass(frozen=True)
class LiveWorkers:
    trust_class: str
    device: str
    workers: int
    tokens_per_second: float


@dataclass(frozen=True)
class SourceTarget:
    name: str
    language: str
    weight: float  # as the scheduler applies it (voted, in a governed run); target share: weight / their sum


@dataclass(frozen=True)
class EvaluationFigure:
    round: int
    group: str  # all | language | source
    name: str
    loss: float
    bits_per_byte: float


@dataclass(frozen=True)
class EpochProgress:
    epoch: int
    tokens: int
    trained: int
    read_at: float  # time.time() of its reading


@dataclass(frozen=True)
class RunFigures:
    run_id: str
    total_rounds: int
    read_at: float        # time.time() of the reading
    read_seconds: float   # how long the reading took (the epoch's progress excepted)
    rounds: list[RoundFigures]  # every decided round, oldest first
    workers_total: int
    live: list[LiveWorkers]
    leases_out: int
    tokens_out: int
    leases_expired: int
    trained: list[TrainedTokens]
    energy: list[InstitutionEnergy]
    sources: list[SourceTarget]
    evaluations: list[EvaluationFigure]  # oldest round first
    epoch: EpochProgress

    @property
    def current_round(self) -> int:
        return self.rounds[-1].number + 1 if self.rounds else 0

    @property
    def live_workers(self) -> int:
        return sum(group.workers for group in self.live)

    @property
    def tokens_per_second(self) -> float:
        return sum(group.tokens_per_second for group in self.live)

    @property
    def eta_seconds(self) -> float:
        """Seconds to the end of the epoch at the live throughput; 0 when unknown or done (as `essaim status`)."""
        remaining = self.epoch.tokens - self.epoch.trained
        return remaining / self.tokens_per_second if self.tokens_per_second > 0 and remaining > 0 else 0.0


class FiguresCache:
    """The run's figures from one shared reading, read again when too old. Thread-safe: one reader at a time."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        run_id: str,
        total_rounds: int,
        live_within_seconds: float,
        max_age_seconds: float = DEFAULT_MAX_AGE_SECONDS,
        voted_mixture: Callable[[int], dict[str, float]] | None = None,  # a governed run's weights at a round
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sessions = sessions
        self._run_id = run_id
        self._total_rounds = total_rounds
        self._live_within_seconds = live_within_seconds
        self._voted_mixture = voted_mixture
        self.max_age_seconds = max_age_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._figures: RunFigures | None = None
        self._fresh_until = 0.0
        self._epoch: EpochProgress | None = None
        self._epoch_fresh_until = 0.0
        self.readings = 0  # database readings so far: callers inside one window share one
        self.epoch_readings = 0  # of them, those that read the epoch's progress too

    def current(self) -> RunFigures:
        with self._lock:
            started = self._clock()
            if self._figures is not None and started < self._fresh_until:
                return self._figures
            with self._sessions() as session:
                if self._epoch is None or started >= self._epoch_fresh_until:
                    self._epoch = EpochProgress(*oldest_open_epoch(session), read_at=time.time())
                    self.epoch_readings += 1
                    self._epoch_fresh_until = started + max(self.max_age_seconds,
                                                            EPOCH_SHARE_OF_TIME * (self._clock() - started))
                read_started = self._clock()
                self._figures = self._read(session, self._epoch, read_started)
            self.readings += 1
            took = self._clock() - read_started
            self._fresh_until = started + max(self.max_age_seconds, MAX_SHARE_OF_TIME * took)
            return self._figures

    def _read(self, session: Session, epoch: EpochProgress, started: float) -> RunFigures:
        now = time.time()
        cutoff = now - self._live_within_seconds
        live = [
            LiveWorkers(trust_class, device, count, float(throughput))
            for trust_class, device, count, throughput in session.execute(
                select(Worker.trust_class, Worker.device, func.count(Worker.id),
                       func.coalesce(func.sum(Worker.tokens_per_second), 0.0))
                # A quarantined worker may still call, but it trains nothing: not live (as `essaim status`).
                .where(Worker.last_seen >= cutoff, Worker.quarantined_at.is_(None))
                .group_by(Worker.trust_class, Worker.device).order_by(Worker.trust_class, Worker.device))
        ]
        leases_out, tokens_out = session.execute(
            select(func.count(Lease.id), func.coalesce(func.sum(Lease.end - Lease.start), 0))
            .where(Lease.state == "granted")).one()
        trained = [
            TrainedTokens(source, language, institution, trust_class, verification, int(tokens))
            for source, language, institution, trust_class, verification, tokens in session.execute(
                select(Shard.source, Shard.language, LineageRecord.institution, Worker.trust_class,
                       LineageRecord.verification, func.sum(LineageRecord.end - LineageRecord.start))
                .join(Shard, Shard.id == LineageRecord.shard_id).join(Worker, Worker.id == LineageRecord.worker_id)
                .where(LineageRecord.rewound_at.is_(None))
                .group_by(Shard.source, Shard.language, LineageRecord.institution, Worker.trust_class,
                          LineageRecord.verification))
        ]
        energy = [
            InstitutionEnergy(institution, float(joules), float(gram_joules) / JOULES_PER_KWH)
            for institution, joules, gram_joules in session.execute(
                select(Worker.institution, func.sum(Contribution.energy_joules),
                       func.sum(Contribution.energy_joules * Worker.grid_gco2_per_kwh))
                .join(Worker, Worker.id == Contribution.worker_id)
                .group_by(Worker.institution).order_by(Worker.institution))
        ]
        rounds = _rounds(session)
        # The mixture the scheduler follows: the corpus's weights, or those voted for the open round.
        voted = self._voted_mixture(rounds[-1].number + 1 if rounds else 0) if self._voted_mixture else {}
        return RunFigures(
            run_id=self._run_id, total_rounds=self._total_rounds, read_at=now, read_seconds=self._clock() - started,
            rounds=rounds, workers_total=session.scalar(select(func.count(Worker.id))) or 0, live=live,
            leases_out=leases_out, tokens_out=int(tokens_out),
            leases_expired=session.scalar(select(func.count(Lease.id)).where(Lease.state == "expired")) or 0,
            trained=trained, energy=energy,
            sources=[SourceTarget(s.name, s.language, voted.get(s.name, s.weight))
                     for s in session.scalars(select(Source).order_by(Source.name))],
            evaluations=[EvaluationFigure(e.round, e.group, e.name, e.loss, e.bits_per_byte)
                         for e in session.scalars(select(Evaluation).order_by(Evaluation.round, Evaluation.group,
                                                                               Evaluation.name))],
            epoch=epoch,
        )


def _rounds(session: Session) -> list[RoundFigures]:
    costs = {
        number: (int(sent), float(joules))
        for number, sent, joules in session.execute(
            select(Contribution.round, func.sum(Contribution.bytes_sent), func.sum(Contribution.energy_joules))
            .group_by(Contribution.round))
    }
    figures: list[RoundFigures] = []
    previous: tuple[int, float] | None = None  # the round before: its number and its first report's time
    for number, reports, tokens, loss_sum, group_size, first_report_at in session.execute(
            select(Round.number, Round.reports, Round.tokens, Round.loss_sum, Round.max_group_size,
                   Round.first_report_at).order_by(Round.number)):
        sent, joules = costs.get(number, (0, 0.0))
        # A round ends when the next one's first report comes; after a gap (a rewind) its wall time is unknown.
        wall = first_report_at - previous[1] if previous is not None and previous[0] == number - 1 else None
        figures.append(RoundFigures(number, reports, tokens, loss_sum / max(reports, 1), group_size, wall, sent, joules))
        previous = (number, first_report_at)
    return figures
