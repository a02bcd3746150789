"""Which model a round keeps, and that its tokens are recorded exactly once (coordinator/rounds.py)."""

import dataclasses
import json

import pytest
from sqlalchemy import select

from coordinator.accounting import accounting_problems
from coordinator.rounds import Member, winner
from coordinator.scheduler import AtLimit, LeaseError, LeaseLimits, NotOpenYet, RoundOver, RoundReport, Scheduler
from coordinator.store import (
    Contribution, FiledReport, Lease, LineageRecord, Worker, load_manifest, open_engine, session_factory,
)
from model.shards import Manifest, ShardInfo, SourceInfo
from support import Clock

WORKERS = ("w1", "w2", "w3", "w4", "solo")
GROUP = "g" * 64


@pytest.fixture
def store(database_url: str):
    """One source, one 10,000-token shard, five registered workers."""
    sessions = session_factory(open_engine(database_url))
    load_manifest(sessions, Manifest(1000, "t" * 64, [SourceInfo("web", "fr", "CC0-1.0", 1.0, "2000-01-01", "2030-12-31")],
                                     [ShardInfo("a", "a.bin", "0" * 64, 10_000, "uint16", "fr", "web", "CC0-1.0",
                                                "2020-01-01", "2020-01-01")]))
    with sessions.begin() as session:
        session.add_all(Worker(id=name, public_key=b"k" * 32, name=name, institution="lab", device="cpu",
                               registered_at=0.0, last_seen=0.0) for name in WORKERS)
    return sessions


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def scheduler(store, clock: Clock) -> Scheduler:
    limits = LeaseLimits(min_tokens=10, max_leases=4, max_tokens=1000, max_seconds=300, decision_seconds=60)
    return Scheduler(store, lease_seconds=30, total_rounds=5, clock=clock, limits=limits)


def report(worker_leases: dict[str, Lease], worker: str, digest: str = GROUP, round_number: int = 0,
           members: tuple[str, ...] = ()) -> RoundReport:
    """The worker's report of its whole lease; `members` are vouched for on their whole leases."""
    lease = worker_leases[worker]
    return RoundReport(
        round=round_number, leases=((lease.id, lease.end - lease.start),), loss=2.0, pseudo_gradient_digest="d" * 64,
        params_digest=digest, group_size=max(len(members), 1),
        members=tuple(Member(m, ((worker_leases[m].id, worker_leases[m].end - worker_leases[m].start),), 2.5)
                      for m in members),
    )


def lease_states(store) -> dict[int, str]:  # type: ignore[no-untyped-def]
    with store() as session:
        return dict(session.execute(select(Lease.id, Lease.state)).all())


def test_the_winner_must_hold_more_than_the_runner_up_could_still_reach() -> None:
    assert winner({"a": 10}, outstanding=9) == "a"
    assert winner({"a": 10}, outstanding=10) is None
    assert winner({"a": 10, "b": 4}, outstanding=5) == "a"
    assert winner({"a": 10, "b": 6}, outstanding=5) is None
    assert winner({"b": 10, "a": 10}, outstanding=0) == "a"  # a tie with nothing out: the smaller digest
    assert winner({}, outstanding=0) is None
    assert winner({"a": 10, "b": 4}, outstanding=50, group_waited={"a"}) == "a"  # a group waited out the window
    assert winner({"a": 10, "b": 10}, outstanding=50, group_waited={"a"}) is None  # but it must lead


def test_a_hoarder_cannot_hold_a_groups_round_open_and_a_lone_reporter_cannot_wait_one_out(
    scheduler: Scheduler, store, clock: Clock
) -> None:
    leases = {w: scheduler.acquire(w, 300, 0).lease for w in ("w1", "w2")}
    leases["solo"] = scheduler.acquire("solo", 10, 0).lease
    hoarded = [scheduler.acquire("w4", 250, 0).lease for _ in range(4)]  # 1,000 tokens, never reported
    assert scheduler.complete_round("solo", report(leases, "solo", digest="s" * 64)).pending
    for seconds in (25, 25, 15):  # 65 s: past the window, but alone the early reporter waits forever
        clock.now += seconds
        for worker in ("w1", "w2", "w4"):  # the hoarder (w4) stays alive, as do the group's workers
            scheduler.heartbeat(worker, 0, 0.0, 1.0)
        scheduler.expire_overdue()
    assert scheduler.current_round() == 0
    group = ("w1", "w2")
    assert scheduler.complete_round("w1", report(leases, "w1", members=group)).pending  # 1,000 tokens still out
    clock.now += 59
    for worker in ("w2", "w4"):
        scheduler.heartbeat(worker, 0, 0.0, 1.0)
    scheduler.expire_overdue()
    assert scheduler.current_round() == 0
    clock.now += 2  # the group's window is over: the hoarder's leases no longer count
    for worker in ("w2", "w4"):
        scheduler.heartbeat(worker, 0, 0.0, 1.0)
    scheduler.expire_overdue()
    assert scheduler.current_round() == 1 and scheduler.kept_params_digest(0) == GROUP
    assert scheduler.complete_round("w2", report(leases, "w2", members=group)).accepted  # vouched already
    assert {lease_states(store)[lease.id] for lease in hoarded} == {"granted"}  # until their hard end
    assert accounting_problems(store) == []


def test_a_solo_worker_reporting_first_cannot_void_a_full_groups_round(scheduler: Scheduler, store) -> None:
    leases = {w: scheduler.acquire(w, 400, 0).lease for w in ("w1", "w2", "w3", "w4")}
    leases["solo"] = scheduler.acquire("solo", 10, 0).lease  # the smallest lease there is
    solo = scheduler.complete_round("solo", report(leases, "solo", digest="s" * 64))
    assert solo.pending and scheduler.current_round() == 0  # 10 tokens against 1,600 still out
    answers = [scheduler.complete_round(w, report(leases, w)) for w in ("w1", "w2", "w3", "w4")]
    assert [a.pending for a in answers] == [True, True, False, False]  # decided once three of four are in
    assert answers[-1].accepted and answers[-1].round_params_digest == GROUP
    first_again = scheduler.complete_round("w1", report(leases, "w1"))
    solo_again = scheduler.complete_round("solo", report(leases, "solo", digest="s" * 64))
    assert first_again.accepted and (solo_again.accepted, solo_again.round_params_digest) == (False, GROUP)
    assert scheduler.current_round() == 1 and scheduler.kept_params_digest(0) == GROUP
    assert lease_states(store)[leases["solo"].id] == "released"  # its 10 tokens are back in the pool
    assert accounting_problems(store) == []


def test_a_report_for_another_round_than_its_lease_or_the_open_round_is_refused_and_changes_nothing(
    scheduler: Scheduler, store
) -> None:
    leases = {w: scheduler.acquire(w, 100, 0).lease for w in ("w1", "w2")}
    with pytest.raises(LeaseError, match="round 4 is not open: the run is at round 0"):
        scheduler.complete_round("w1", report(leases, "w1", round_number=4))  # the last round, on a round-0 lease
    with pytest.raises(LeaseError, match="round 1 is not open yet"):
        scheduler.acquire("w2", 100, 1)  # a lease for a future round
    assert not scheduler.run_complete(0) and scheduler.current_round() == 0
    assert set(lease_states(store).values()) == {"granted"}
    scheduler.complete_round("w1", report(leases, "w1"))
    scheduler.complete_round("w2", report(leases, "w2"))
    with pytest.raises(RoundOver, match="round 0 is over: the run is at round 1"):
        scheduler.acquire("w1", 100, 0)
    later = {"w3": scheduler.acquire("w3", 100, 1).lease}
    with pytest.raises(LeaseError, match="lease .* was granted for round 1, not round 0"):
        scheduler.complete_round("w3", report(later, "w3", round_number=0))
    with store() as session:
        assert session.scalars(select(FiledReport).where(FiledReport.round == 1)).all() == []
    assert accounting_problems(store) == []


def test_a_group_vouches_for_a_member_whose_report_is_lost(scheduler: Scheduler, store) -> None:
    leases = {w: scheduler.acquire(w, 300, 0).lease for w in ("w1", "w2", "w3")}
    group = ("w1", "w2", "w3")
    scheduler.complete_round("w1", report(leases, "w1", members=group))
    assert scheduler.complete_round("w2", report(leases, "w2", members=group)).accepted  # 600 of 900: decided
    with store() as session:
        vouched = session.scalars(select(LineageRecord).where(LineageRecord.worker_id == "w3")).one()
        assert (vouched.start, vouched.end, vouched.loss) == (leases["w3"].start, leases["w3"].end, 2.5)
    late = scheduler.complete_round("w3", report(leases, "w3", members=group))  # its report, after all
    assert late.accepted and late.lineage_ids == [vouched.id]  # the same record, not a second one
    with store() as session:
        assert len(session.scalars(select(LineageRecord)).all()) == 3
    assert accounting_problems(store) == []


def test_a_rounds_energy_is_shared_among_its_lineage_by_tokens_and_a_vouched_member_has_it_once_it_reports(
    scheduler: Scheduler, store
) -> None:
    leases = {w: scheduler.acquire(w, 300, 0).lease for w in ("w1", "w2", "w3")}
    second = scheduler.acquire("w1", 100, 0).lease  # w1 trains on two leases: 300 and 100 tokens
    group = ("w1", "w2", "w3")
    w1 = dataclasses.replace(report(leases, "w1", members=group), energy_joules=400.0, energy_method="rapl",
                             leases=((leases["w1"].id, 300), (second.id, 100)))
    w2 = dataclasses.replace(report(leases, "w2", members=group), energy_joules=90.0, energy_method="estimate")
    assert RoundReport.from_json(w1.to_json()) == w1
    scheduler.complete_round("w1", w1)
    assert scheduler.complete_round("w2", w2).accepted  # 700 of 1,000 tokens: decided, w3 vouched for
    with store() as session:
        energy = {(c.worker_id, c.energy_joules, c.energy_method) for c in session.scalars(select(Contribution))}
        assert energy == {("w1", 400.0, "rapl"), ("w2", 90.0, "estimate"), ("w3", 0.0, "")}
        shares = {(r.worker_id, r.end - r.start): r.energy_joules for r in session.scalars(select(LineageRecord))}
        assert shares == {("w1", 300): 300.0, ("w1", 100): 100.0, ("w2", 300): 90.0, ("w3", 300): 0.0}
    # Its own report, after its group vouched for it: what only that report says fills in its records.
    w3 = dataclasses.replace(report(leases, "w3", members=group), energy_joules=60.0, energy_method="estimate",
                             bytes_sent=1234, inner_seconds=2.0, wall_seconds=3.0)
    assert scheduler.complete_round("w3", w3).accepted
    assert scheduler.complete_round("w3", w3).accepted  # a retry writes the same figures again
    with store() as session:
        own = session.scalars(select(Contribution).where(Contribution.worker_id == "w3")).one()
        assert (own.energy_joules, own.energy_method, own.bytes_sent, own.inner_seconds, own.wall_seconds) == (
            60.0, "estimate", 1234, 2.0, 3.0)
        assert session.scalars(select(LineageRecord.energy_joules).where(LineageRecord.worker_id == "w3")).all() == [60.0]
        assert len(session.scalars(select(Contribution)).all()) == 3
    older = json.loads(w2.to_json())  # a report filed before reports carried energy
    del older["energy_joules"], older["energy_method"]
    assert RoundReport.from_json(json.dumps(older)) == dataclasses.replace(w2, energy_joules=0.0, energy_method="")


def test_a_late_report_is_recorded_only_with_the_kept_parameters(scheduler: Scheduler, store, clock: Clock) -> None:
    leases = {w: scheduler.acquire(w, 300, 0).lease for w in ("w1", "w2", "w3", "w4")}
    for w in ("w1", "w2", "w3"):
        scheduler.complete_round(w, report(leases, w))
    assert scheduler.current_round() == 1
    stray = scheduler.complete_round("w4", report(leases, "w4", digest="x" * 64))
    assert (stray.accepted, stray.round_params_digest) == (False, GROUP)
    assert lease_states(store)[leases["w4"].id] == "granted"  # refused: nothing changed; the worker releases it
    assert scheduler.complete_round("w4", report(leases, "w4")).accepted  # a member that reported after the decision
    assert accounting_problems(store) == []


def test_an_undecided_round_is_decided_when_the_leases_still_out_expire(scheduler: Scheduler, store, clock: Clock) -> None:
    leases = {w: scheduler.acquire(w, 300, 0).lease for w in ("w1", "w2")}
    assert scheduler.complete_round("w1", report(leases, "w1")).pending  # w2 could still tie
    clock.now += 31  # w2 died: no heartbeat, its lease expires
    assert scheduler.expire_overdue() == 1 and scheduler.current_round() == 1
    assert scheduler.complete_round("w1", report(leases, "w1")).accepted
    assert lease_states(store) == {leases["w1"].id: "completed", leases["w2"].id: "expired"}
    assert accounting_problems(store) == []


def test_a_worker_holds_no_more_leases_or_tokens_than_the_limits(scheduler: Scheduler, store) -> None:
    tiny = scheduler.acquire("w1", 1, 0).lease
    assert tiny.end - tiny.start == 10  # a smaller request gets the minimum lease
    for _ in range(3):
        scheduler.acquire("w1", 100, 0)
    with pytest.raises(AtLimit, match=r"holds 4 leases \(310 tokens\); .* at most 4 leases"):
        scheduler.acquire("w1", 100, 0)
    scheduler.release("w1", tiny.id)
    assert scheduler.acquire("w1", 100, 0).lease.id != tiny.id  # released: room for one more
    held = [scheduler.acquire("w2", 300, 0).lease for _ in range(3)]
    last = scheduler.acquire("w2", 300, 0).lease
    assert last.end - last.start == 100 and sum(h.end - h.start for h in held) == 900  # up to 1,000 tokens
    with pytest.raises(AtLimit, match="report or release some first"):
        scheduler.acquire("w2", 300, 0)
    too_many = RoundReport(round=0, leases=tuple((i, 1) for i in range(1, 6)), loss=1.0,
                           pseudo_gradient_digest="d" * 64, params_digest=GROUP, group_size=1)
    with pytest.raises(LeaseError, match="names 5 leases; a worker holds at most 4"):
        scheduler.complete_round("w1", too_many)
    assert accounting_problems(store) == []


def test_heartbeats_do_not_keep_a_lease_alive_past_its_hard_end(scheduler: Scheduler, store, clock: Clock) -> None:
    lease = scheduler.acquire("w1", 100, 0).lease
    for _ in range(12):  # a hoarder heartbeating for 300 s without reporting
        clock.now += 25
        scheduler.heartbeat("w1", 0, 0.0, 1.0)
        scheduler.flush_heartbeats()
    assert scheduler.expire_overdue() == 0  # 300 s after the grant: its last deadline
    clock.now += 1
    assert scheduler.expire_overdue() == 1 and lease_states(store)[lease.id] == "expired"
    assert accounting_problems(store) == []


def test_a_reported_lease_neither_expires_nor_can_be_released_while_its_round_is_undecided(
    scheduler: Scheduler, store, clock: Clock
) -> None:
    leases = {w: scheduler.acquire(w, 300, 0).lease for w in ("w1", "w2")}
    scheduler.complete_round("w1", dataclasses.replace(report(leases, "w1"), params_digest="a" * 64))
    with pytest.raises(LeaseError, match="awaits its round's decision"):
        scheduler.release("w1", leases["w1"].id)
    clock.now += 1000
    scheduler.heartbeat("w2", 0, 0.0, 1.0)  # w2 is alive but its lease passed its hard end
    assert scheduler.expire_overdue() == 1  # w2's, not w1's reported one: the round is decided for w1's group
    assert lease_states(store)[leases["w1"].id] == "completed"
    assert accounting_problems(store) == []


def test_overlapping_a_worker_that_trained_the_open_round_leases_the_next_one_and_is_not_counted_idle(
    store, clock: Clock
) -> None:
    limits = LeaseLimits(min_tokens=10, max_leases=8, max_tokens=2000, max_seconds=300, decision_seconds=60,
                         idle_stake=1000, live_seconds=15)
    plain = Scheduler(store, lease_seconds=30, total_rounds=5, clock=clock, limits=limits)
    ahead = Scheduler(store, lease_seconds=30, total_rounds=5, clock=clock, limits=limits, lease_ahead=True)
    for worker in ("w1", "w2", "w3"):  # the live ones
        ahead.heartbeat(worker, 0, 0.0, 1.0)
    ahead.flush_heartbeats()
    leases = {"w1": ahead.acquire("w1", 300, 0).lease}
    with pytest.raises(LeaseError, match="round 1 is not open yet"):
        plain.acquire("w1", 300, 1)  # a run that does not overlap: one round at a time
    next_round = {"w1": ahead.acquire("w1", 300, 1).lease}  # it trained round 0, which averages meanwhile
    with pytest.raises(NotOpenYet, match="round 1 is not open yet"):
        ahead.acquire("w3", 300, 1)  # w1 alone holds round 0: its averaging would wait for w3 there
    leases["w2"] = ahead.acquire("w2", 300, 0).lease
    with pytest.raises(LeaseError, match="round 2 is not open yet"):
        ahead.acquire("w1", 300, 2)  # one round ahead, no more
    next_round["w2"] = ahead.acquire("w2", 300, 1).lease
    assert {lease.round for lease in next_round.values()} == {1}
    # Round 0 has a group without w3 and others train round 1: a joiner would come too late to round 0.
    late = ahead.acquire("w3", 300, 1).lease
    assert late.round == 1
    ahead.release("w3", late.id)
    # w2's averaging of round 0 failed: its round-0 lease goes back, and it trains round 1 on. It is
    # live without a lease of round 0, but not idle there: it will not report round 0. w3 is idle.
    ahead.release("w2", leases["w2"].id)
    assert ahead.complete_round("w1", report(leases, "w1", members=("w1",))).pending  # w3 may still stake 1,000
    clock.now += 16
    for worker in ("w1", "w2"):
        ahead.heartbeat(worker, 1, 0.0, 1.0)
    ahead.flush_heartbeats()
    ahead.expire_overdue()  # w3 fell silent: nothing is out any more, w2's round-1 leases aside
    assert ahead.current_round() == 1 and ahead.kept_params_digest(0) == GROUP
    # w3 is back, but behind (its heartbeats say round 0: it is catching up): round 1 does not wait for it.
    ahead.heartbeat("w3", 0, 0.0, 1.0)
    ahead.flush_heartbeats()
    final = {w: RoundReport(round=1, leases=((next_round[w].id, 100),), loss=2.0, pseudo_gradient_digest="d" * 64,
                            params_digest="h" * 64, group_size=2) for w in ("w1", "w2")}
    for worker in ("w1", "w2"):
        ahead.complete_round(worker, final[worker])
    assert ahead.current_round() == 2
    assert accounting_problems(store) == []


def test_where_processes_share_the_database_a_lease_expires_a_margin_after_its_deadline(store, clock: Clock) -> None:
    scheduler = Scheduler(store, lease_seconds=30, total_rounds=5, clock=clock, expiry_margin=3.0)
    lease = scheduler.acquire("w1", 100, 0).lease
    clock.now = lease.deadline + 2.0
    assert scheduler.expire_overdue() == 0  # another process may still hold a heartbeat from before it, unwritten
    clock.now = lease.deadline + 3.5
    assert scheduler.expire_overdue() == 1
    assert lease_states(store)[lease.id] == "expired"


def test_a_round_with_many_idle_workers_counts_only_as_many_as_decide_it(store, clock: Clock) -> None:
    """The idle stakes are counted up to the leader's margin: a report of a busy round does not scan the swarm."""
    limits = LeaseLimits(min_tokens=10, max_leases=8, max_tokens=2000, max_seconds=300, decision_seconds=60,
                         idle_stake=100, live_seconds=15)
    scheduler = Scheduler(store, lease_seconds=30, total_rounds=5, clock=clock, limits=limits)
    for worker in WORKERS:
        scheduler.heartbeat(worker, 0, 0.0, 1.0)
    scheduler.flush_heartbeats()
    leases = {"w1": scheduler.acquire("w1", 250, 0).lease}
    assert scheduler.complete_round("w1", report(leases, "w1")).pending  # four idle workers may outstake w1's 250
    book = scheduler._rounds
    with store() as session:
        assert book._idle_workers(session, 0, clock.now, at_most=100) == 4
        assert book._idle_workers(session, 0, clock.now, at_most=2) == 2
        # w1 leads by 250: three idle workers (300 tokens) hold the round open, so no more than three are counted.
        assert book._outstanding(session, 0, clock.now, {GROUP: 250}) == 300
    assert scheduler.current_round() == 0
