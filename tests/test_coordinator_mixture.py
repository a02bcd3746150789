"""The data mixture: leases follow the source weights and go oldest first, on a real SQLite store."""

import random

from sqlalchemy import func, select

from coordinator.accounting import accounting_problems
from coordinator.mixture import mixture_order, target_shares
from coordinator.round_terms import RoundTerms
from coordinator.scheduler import RoundReport, Scheduler
from coordinator.store import LineageRecord, Round, Shard, Worker, load_manifest, open_engine, session_factory
from model.shards import Manifest, ShardInfo, SourceInfo

# Lucie's recipe in miniature: weights as published, sizes deliberately out of proportion.
SOURCES = {  # name: (language, weight, shard sizes)
    "web-en": ("en", 33.0, [3000, 3000, 2000]),
    "web-fr": ("fr", 32.4, [1500, 1500]),
    "code": ("code", 15.0, [9000]),
    "books-de": ("de", 7.0, [400]),
    "wiki-es": ("es", 6.3, [700, 300]),
    "wiki-it": ("it", 6.3, [5000]),
}


def _store(database_url: str, shards: list[ShardInfo], sources: list[SourceInfo]):
    sessions = session_factory(open_engine(database_url))
    load_manifest(sessions, Manifest(1000, "t" * 64, sources, shards))
    with sessions.begin() as session:
        for name in ("w1", "w2"):
            session.add(Worker(id=name, public_key=b"k" * 32, name=name, institution="inst", device="cpu",
                               registered_at=0.0, last_seen=0.0))
    return sessions


def _decided(store, *rounds: int) -> None:  # type: ignore[no-untyped-def]
    """Mark rounds decided, as the round book would once their reports are in (leases are what is tested here)."""
    with store.begin() as session:
        session.add_all(Round(number=number, first_report_at=0.0, params_digest="p" * 64) for number in rounds)


def _report(round_number: int, leases: list[tuple[int, int]]) -> RoundReport:
    return RoundReport(round=round_number, leases=tuple(leases), loss=1.0, pseudo_gradient_digest="d" * 64,
                       params_digest=f"{round_number:064d}", group_size=2)


def test_mixture_order_puts_the_source_furthest_below_its_share_first() -> None:
    assert mixture_order({"a": 2.0, "b": 1.0, "off": 0.0}, {}) == ["a", "b"]
    assert mixture_order({"a": 2.0, "b": 1.0}, {"a": 300, "b": 100}) == ["b", "a"]
    assert target_shares({"a": 3.0, "b": 1.0, "off": 0.0}) == {"a": 0.75, "b": 0.25, "off": 0.0}


def test_trained_proportions_stay_within_a_point_of_the_weights_despite_faults(database_url: str) -> None:
    shards, sources = [], []
    for name, (language, weight, sizes) in SOURCES.items():
        sources.append(SourceInfo(name, language, "CC0-1.0", weight, "2000-01-01", "2024-12-31"))
        for i, size in enumerate(sizes):
            shards.append(ShardInfo(f"{name}-{i}", f"{name}-{i}.bin", "0" * 64, size, "uint16", language, name,
                                    "CC0-1.0", "2010-01-01", "2010-12-31"))
    store = _store(database_url, shards, sources)
    scheduler = Scheduler(store, lease_seconds=30, total_rounds=10_000)
    rng = random.Random(0)
    for round_number in range(150):
        grants = {worker: [scheduler.acquire(worker, 100, round_number).lease for _ in range(4)]
                  for worker in ("w1", "w2")}
        left = {worker for worker in grants if rng.random() < 0.1}
        for worker in left:  # a worker that leaves mid-round gives its leases back
            for lease in grants[worker]:
                scheduler.release(worker, lease.id)
        reports = {}
        for worker in sorted(set(grants) - left):
            # Time-bounded rounds: the last lease is sometimes only partly trained.
            trained = [(g.id, g.end - g.start) for g in grants[worker][:-1]]
            last = grants[worker][-1]
            trained.append((last.id, rng.randint(1, last.end - last.start)))
            reports[worker] = _report(round_number, trained)
            scheduler.complete_round(worker, reports[worker])
        for worker, report in reports.items():  # the round is decided once both are in
            assert scheduler.complete_round(worker, report).accepted
        if not reports:
            _decided(store, round_number)
    assert accounting_problems(store) == []
    with store() as session:
        trained = dict(session.execute(
            select(Shard.source, func.sum(LineageRecord.end - LineageRecord.start))
            .join(Shard, Shard.id == LineageRecord.shard_id).group_by(Shard.source)
        ).all())
    total = sum(trained.values())
    assert total > 50_000  # many times every source (33,300 tokens in all), so repeats happen
    targets = target_shares({name: weight for name, (_, weight, _) in SOURCES.items()})
    for name, target in targets.items():
        assert abs(trained[name] / total - target) < 0.01, (name, trained[name] / total, target)


def test_a_source_is_leased_oldest_shard_first(database_url: str) -> None:
    dates = {"news-0": "2023-05-01", "news-1": "2019-02-01", "news-2": "2021-07-01"}
    shards = [ShardInfo(shard_id, f"{shard_id}.bin", "0" * 64, 50, "uint16", "fr", "news", "CC-BY-4.0", date, date)
              for shard_id, date in dates.items()]
    store = _store(database_url, shards, [SourceInfo("news", "fr", "CC-BY-4.0", 1.0, "2019-01-01", "2023-12-31")])
    scheduler = Scheduler(store, lease_seconds=30, total_rounds=10)
    order = [scheduler.acquire("w1", 50, 0).lease.shard_id for _ in range(4)]
    assert order == ["news-1", "news-2", "news-0", "news-1"]  # then the next epoch, oldest first again
    assert accounting_problems(store) == []


def test_voted_mixture_weights_take_over_from_their_round(database_url: str) -> None:
    shards = [ShardInfo(f"{name}-0", f"{name}.bin", "0" * 64, 100_000, "uint16", "fr", name, "CC-BY-4.0",
                        "2020-01-01", "2020-12-31") for name in ("news", "books")]
    sources = [SourceInfo(name, "fr", "CC-BY-4.0", 1.0, "2020-01-01", "2020-12-31") for name in ("news", "books")]
    store = _store(database_url, shards, sources)
    # As governance would have it: from round 5, books weigh 3 to news's 1 (an unknown source is ignored).
    voted = {"books": 3.0, "gone": 9.0}
    scheduler = Scheduler(store, lease_seconds=30, total_rounds=100,
                          terms=lambda round_: RoundTerms(mixture=voted if round_ >= 5 else {}))

    def leased(round_: int, leases: int) -> dict[str, int]:
        counts = {"news": 0, "books": 0}
        for _ in range(leases):
            counts[scheduler.acquire("w1", 100, round_).lease.shard_id.split("-")[0]] += 1
        return counts

    assert leased(0, 40) == {"news": 20, "books": 20}
    _decided(store, *range(5))  # rounds 0..4 are over: round 5 is open
    assert leased(5, 80) == {"news": 10, "books": 70}  # 30 and 90 of the 120 leases so far: 1:3, as voted
