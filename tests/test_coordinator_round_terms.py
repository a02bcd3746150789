"""The scheduler under a governed run: a voted inner_steps resizes leases, and lineage names the config in force."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from coordinator.config import RunSettings
from coordinator.governed import GovernedRun
from coordinator.round_terms import round_terms
from coordinator.scheduler import RoundReport, Scheduler
from coordinator.store import LineageRecord
from governance.documents import digest, generate_key, load_key, make_genesis, make_proposal, make_vote
from governance.ledger import Ledger
from governance.state import UNGOVERNED_CONFIG_VERSION
from support import one_shard_store

POLICY = {"quorum": 2, "threshold": 2, "voting_period_rounds": 3, "activation_delay_rounds": 2}
RUN = RunSettings(inner_steps=20, batch_size=4, seq_len=64, leases_per_round=4)  # leases of 20*4*64/4 = 1280


def _ledger_raising_inner_steps(tmp_path: Path) -> tuple[Path, str, str, int]:
    """A ledger whose maintainers voted inner_steps 20 -> 40 at round 1; (path, genesis, proposal, activation)."""
    keys = {}
    for name in ("alice", "bob"):
        public = generate_key(tmp_path / f"{name}.key")
        keys[name] = (public, load_key(tmp_path / f"{name}.key"))
    genesis = make_genesis("terms", {n: k[0] for n, k in keys.items()}, POLICY, {"inner_steps": 20}, {})
    ledger = Ledger(genesis)
    proposal = make_proposal(digest(genesis), "alice", {"config": {"inner_steps": 40}}, "longer rounds",
                             keys["alice"][1], round_=1)
    ledger.append(proposal, 1)
    for voter in keys:
        ledger.append(make_vote(digest(genesis), proposal, voter, "yes", keys[voter][1], round_=1), 1)
    (accepted,) = ledger.state.accepted  # passed by the vote signed at round 1
    path = tmp_path / "ledger.json"
    ledger.save(path)
    return path, digest(genesis), accepted.proposal, accepted.activation_round


def _scheduler(database_url: str, governed: GovernedRun | None):  # type: ignore[no-untyped-def]
    sessions = one_shard_store(database_url)
    return Scheduler(sessions, lease_seconds=30, total_rounds=100, terms=round_terms(RUN, governed)), sessions


def _train_round(scheduler: Scheduler, sessions, round_: int) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    """Lease as much as a worker asks for, report it; (lease size, config version recorded)."""
    lease = scheduler.acquire("w", 10**9, round_).lease
    recorded = scheduler.complete_round("w", RoundReport(
        round=round_, leases=((lease.id, lease.end - lease.start),), loss=1.0, pseudo_gradient_digest="d" * 64,
        params_digest=f"{round_:064d}", group_size=1))
    with sessions() as session:
        version = session.scalar(select(LineageRecord.config_version).where(LineageRecord.id == recorded.lineage_ids[0]))
    return lease.end - lease.start, version


def test_a_voted_inner_steps_resizes_leases_and_lineage_names_the_proposal_from_its_round(
    database_url: str, tmp_path: Path
) -> None:
    path, genesis_hash, proposal_id, activation = _ledger_raising_inner_steps(tmp_path)
    assert activation == 3
    scheduler, sessions = _scheduler(database_url, GovernedRun(path))
    terms = [_train_round(scheduler, sessions, round_) for round_ in range(5)]
    assert terms == [(1280, genesis_hash)] * 3 + [(2560, proposal_id)] * 2


def test_an_ungoverned_run_leases_from_its_settings_and_records_one_config(database_url: str) -> None:
    scheduler, sessions = _scheduler(database_url, None)
    assert [_train_round(scheduler, sessions, round_) for round_ in range(2)] == [(1280, UNGOVERNED_CONFIG_VERSION)] * 2
