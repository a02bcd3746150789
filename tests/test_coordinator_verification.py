"""Checked work (coordinator/verification.py): sampled and triggered checks, validators' verdicts, quarantine, credit."""

from __future__ import annotations

import math
import time
from concurrent import futures
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from coordinator.accounting import accounting_problems
from coordinator.admission import Admission
from coordinator.audit import verify_run
from coordinator.card import build_card, card_markdown
from coordinator.config import AdmissionSettings, CoordinatorSettings, RunSettings
from coordinator.corpus_files import CorpusFiles
from coordinator.round_terms import round_terms
from coordinator.rewind import rewind
from coordinator.rounds import Member
from coordinator.scheduler import LeaseLimits, Quarantined, RoundReport, Scheduler
from coordinator.server import build_run_config, lease_limits, run_id_for
from coordinator.service import CoordinatorService
from coordinator.store import (
    Check, FiledReport, Lease, LineageRecord, TokenRange, Worker, load_manifest, open_engine, session_factory, sqlite_url,
)
from coordinator.verification import (
    NotAValidator, ReducerWitnesses, Sampler, Verdict, VerdictRefused, anomalies, sample_probability,
)
from model.checkpoints import Checkpoint
from model.shards import Manifest, ShardInfo, SourceInfo
from protocol import essaim_pb2 as pb
from protocol.auth import RequestVerifier
from protocol.certificates import certify
from protocol.identity import Identity
from protocol.limits import SERVER_OPTIONS
from support import Clock, wait_for
from worker.capabilities import Capabilities
from worker.client import CoordinatorClient, CoordinatorRefused

CPU = Capabilities("cpu", 0, "volunteer", 0.0, "", 0.0)
ALWAYS, NEVER = (lambda: 0.0), (lambda: 0.999_999)  # draws: every report sampled, none


def witness(sender: str, norm: float = 1.0, median: float = 1.0, cosine: float = 0.9, finite: bool = True,
            start: int = 0, end: int = 100) -> pb.SliceWitness:
    return pb.SliceWitness(sender_peer_id=sender, start=start, end=end, finite=finite, norm=norm,
                           projections=[0.5] * 8, cosine_to_aggregate=cosine, median_norm=median)


def claim(digest: str = "c" * 64) -> pb.WorkClaim:
    return pb.WorkClaim(pseudo_gradient_digest=digest, pseudo_gradient_norm=1.0, loss_before=3.0, loss_after=2.5,
                        step_leases=[1, 1], device="cpu", precision="fp32")


def evidence(with_claim: bool = True, witnesses: tuple[pb.SliceWitness, ...] = ()) -> bytes:
    request = pb.CompleteRoundRequest(witnesses=witnesses)
    if with_claim:
        request.claim.CopyFrom(claim())
    return request.SerializeToString()


# -- sampling and anomalies, as pure functions ----------------------------------------------------


def test_a_new_volunteer_is_checked_a_quarter_of_the_time_until_a_check_passes() -> None:
    assert sample_probability(0.025, "volunteer", 0) == pytest.approx(0.25)
    assert sample_probability(0.025, "institution", 0) == pytest.approx(0.125)
    assert sample_probability(0.025, "hpc", 0) == pytest.approx(0.0625)
    assert sample_probability(0.025, "volunteer", 1) == pytest.approx(0.15)
    assert sample_probability(0.025, "volunteer", 10_000) == pytest.approx(0.05, abs=1e-4)  # an established one
    assert sample_probability(0.025, "stranger", 0) == sample_probability(0.025, "volunteer", 0)
    assert sample_probability(1.0, "hpc", 0) == 1.0 and sample_probability(0.0, "volunteer", 0) == 0.0
    assert 1 - (1 - sample_probability(0.025, "volunteer", 0)) ** 10 == pytest.approx(0.94, abs=0.005)
    assert Sampler(0.025, draw=lambda: 0.2499).sampled("volunteer", 0)
    assert not Sampler(0.025, draw=lambda: 0.25).sampled("volunteer", 0)


def test_witnesses_flag_a_huge_zero_or_non_finite_part_and_one_against_the_aggregate() -> None:
    honest = [witness("r"), witness("a", norm=1.1), witness("b", norm=0.9)]
    assert anomalies([ReducerWitnesses("r", honest)]) == {}
    huge = anomalies([ReducerWitnesses("r", [*honest, witness("x", norm=100.0)])])
    assert huge == {"x": "witness: norm 100x the median"}
    zero = anomalies([ReducerWitnesses("r", [*honest, witness("x", norm=0.0)])])
    assert zero["x"].startswith("witness: norm 0 where the median is 1")
    for broken in (witness("x", finite=False), witness("x", norm=math.nan)):
        assert anomalies([ReducerWitnesses("r", [*honest, broken])]) == {"x": "witness: not finite (it sent NaN or infinity)"}
    against = anomalies([ReducerWitnesses("r", [*honest, witness("x", cosine=-0.4)])])
    assert against == {"x": "witness: cosine -0.40 to its slice's aggregate"}
    # With two senders the median is their mean: a negative cosine says nothing, and a norm
    # out of the band cannot say which one is off, so the other sender is checked either way.
    assert anomalies([ReducerWitnesses("r", [witness("r"), witness("x", cosine=-0.4)])]) == {}
    pair = anomalies([ReducerWitnesses("r", [witness("r", norm=1.0, median=50.5), witness("x", norm=100.0, median=50.5)])])
    assert list(pair) == ["x"] and "in a slice of 2 senders" in pair["x"]


def test_a_reducers_witness_about_itself_does_not_count() -> None:
    boasting = [witness("r", norm=100.0), witness("a"), witness("b")]
    assert anomalies([ReducerWitnesses("r", boasting)]) == {}
    assert anomalies([ReducerWitnesses("a", boasting)]) == {"r": "witness: norm 100x the median"}


def test_run_settings_name_an_aggregation_and_a_verify_fraction_that_define_the_run(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="aggregation 'median' is not one of mean, clipped_mean, trimmed_mean"):
        RunSettings(aggregation="median")
    with pytest.raises(ValueError, match="verify_fraction"):
        RunSettings(verify_fraction=1.5)

    def run_id(**run: object) -> str:
        return run_id_for(CoordinatorSettings(data_dir=tmp_path, database_url="sqlite://", run=RunSettings(**run)), "r")

    assert len({run_id(), run_id(verify_fraction=0.1), run_id(aggregation="mean")}) == 3
    # Overlapped averaging defines the run too; it has no replay to check, nor a moment to evaluate.
    assert run_id(overlap_averaging=True, verify_fraction=0) != run_id(verify_fraction=0)
    for refused in (dict(), dict(verify_fraction=0, eval_every_rounds=2)):
        with pytest.raises(ValueError, match="set verify_fraction = 0 and eval_every_rounds = 0"):
            RunSettings(overlap_averaging=True, **refused)


# -- the round book and the scheduler, on SQLite and PostgreSQL ---------------------------------


@pytest.fixture
def store(database_url: str):
    """One 10,000-token shard; volunteers v1..v4 and certified validators "lab" and "lab2"."""
    sessions = session_factory(open_engine(database_url))
    load_manifest(sessions, Manifest(1000, "t" * 64, [SourceInfo("web", "fr", "CC0-1.0", 1.0, "2000-01-01", "2030-12-31")],
                                     [ShardInfo("a", "a.bin", "0" * 64, 10_000, "uint16", "fr", "web", "CC0-1.0",
                                                "2020-01-01", "2020-01-01")]))
    with sessions.begin() as session:
        for name in ("v1", "v2", "v3", "v4", "lab", "lab2"):
            certified = name.startswith("lab")
            session.add(Worker(id=name, public_key=b"k" * 32, name=name, institution="lab" if certified else
                               "independent", device="cpu", registered_at=0.0, last_seen=0.0,
                               trust_class="institution" if certified else "volunteer"))
    return sessions


def book_scheduler(store, draw) -> Scheduler:  # type: ignore[no-untyped-def]
    limits = LeaseLimits(min_tokens=10, max_leases=4, max_tokens=1000, max_seconds=300, decision_seconds=60)
    return Scheduler(store, lease_seconds=30, total_rounds=5, clock=Clock(), limits=limits, sampler=Sampler(0.025, draw))


def filed_report(lease: Lease, evidence_bytes: bytes, members: tuple[Member, ...] = (), round_number: int = 0,
                 digest: str = "g" * 64) -> RoundReport:
    return RoundReport(round=round_number, leases=((lease.id, lease.end - lease.start),), loss=2.0,
                       pseudo_gradient_digest="d" * 64, params_digest=digest, group_size=3, members=members,
                       evidence=evidence_bytes)


def checks_of(store) -> dict[tuple[str, int], Check]:  # type: ignore[no-untyped-def]
    with store() as session:
        return {(c.worker_id, c.round): c for c in session.scalars(select(Check))}


def test_a_witnessed_anomaly_is_checked_whatever_the_draw_and_a_late_report_is_checked_too(store) -> None:
    scheduler = book_scheduler(store, NEVER)
    leases = {w: scheduler.acquire(w, 200, 0, peer_id=f"peer-{w}").lease for w in ("v1", "v2", "v3")}
    slice_of = {"v1": (0, 100), "v2": (100, 200), "v3": (200, 300)}
    for reducer, (start, end) in slice_of.items():  # each reduces a slice; v3 saw v1 send 100x the median
        seen = [witness(f"peer-{s}", start=start, end=end, norm=100.0 if (reducer, s) == ("v3", "v1") else 1.0)
                for s in ("v1", "v2", "v3")]
        scheduler.complete_round(reducer, filed_report(leases[reducer], evidence(witnesses=tuple(seen))))
    assert scheduler.current_round() == 1
    checks = checks_of(store)
    assert list(checks) == [("v1", 0)] and checks[("v1", 0)].trigger == "anomaly: witness: norm 100x the median"

    # A report after the decision, kept, is sampled like the others (this draw samples everything).
    scheduler = book_scheduler(store, ALWAYS)
    late = scheduler.acquire("v4", 200, 1, peer_id="peer-v4").lease
    for worker in ("v1", "v2"):
        lease = scheduler.acquire(worker, 200, 1).lease
        scheduler.complete_round(worker, filed_report(lease, evidence(), round_number=1))
    assert scheduler.current_round() == 2 and set(checks_of(store)) == {("v1", 0), ("v1", 1), ("v2", 1)}
    assert scheduler.complete_round("v4", filed_report(late, evidence(), round_number=1)).accepted
    assert ("v4", 1) in checks_of(store)
    assert accounting_problems(store) == []


def test_a_report_without_a_claim_is_never_checked(store) -> None:
    scheduler = book_scheduler(store, ALWAYS)
    lease = scheduler.acquire("v1", 200, 0, peer_id="peer-v1").lease
    scheduler.complete_round("v1", filed_report(lease, evidence(with_claim=False, witnesses=(witness("peer-v1"),))))
    assert scheduler.current_round() == 1 and checks_of(store) == {}


def test_a_quarantined_worker_gets_no_lease_no_credit_and_no_vouching(store) -> None:
    scheduler = book_scheduler(store, ALWAYS)
    leases = {w: scheduler.acquire(w, 200, 0).lease for w in ("v1", "v2")}
    for worker in ("v1", "v2"):
        scheduler.complete_round(worker, filed_report(leases[worker], evidence()))
    with pytest.raises(NotAValidator, match="validators need an institution certificate"):
        scheduler.take_check("v3")
    taken = scheduler.take_check("lab")
    assert (taken.check.worker_id, taken.check.round) == ("v1", 0)
    granted = scheduler.acquire("v1", 200, 1).lease  # v1 holds a lease of round 1 when convicted
    scheduler.submit_verdict("lab", Verdict(taken.check.id, "failed", "replay: cosine -0.98", cosine=-0.98))
    with pytest.raises(Quarantined, match="worker v1 is quarantined since round 0: replay: cosine -0.98; its "
                                          "reports are not credited"):
        scheduler.acquire("v1", 200, 1)
    with store() as session:
        assert session.get(Lease, granted.id).state == "released"
        assert {r.verification for r in session.scalars(select(LineageRecord).where(LineageRecord.worker_id == "v1"))} \
            == {"rejected"}
    for worker in ("v1", "v2"):  # both still call, but a quarantined worker is not live (nor idle stake)
        scheduler.heartbeat(worker, 1, 2.0, 100.0)
    assert scheduler.live_workers(within_seconds=15) == 1
    # v2's group vouches for v1 in round 1: nothing is recorded for v1.
    lease = scheduler.acquire("v2", 200, 1).lease
    vouching = filed_report(lease, evidence(), members=(Member("v1", ((granted.id, 10),)),), round_number=1)
    assert scheduler.complete_round("v2", vouching).accepted
    with store() as session:
        assert session.scalars(select(LineageRecord.round).where(LineageRecord.worker_id == "v1")).all() == [0]
    assert accounting_problems(store) == []


# -- the service, over real gRPC ---------------------------------------------------------------


GENCI = Ed25519PrivateKey.generate()


class Participant(CoordinatorClient):
    """A worker of the test network: a signed client with a name, and a hivemind peer id made of it."""

    def __init__(self, address: str, name: str) -> None:
        super().__init__(address, Identity.generate(), retry_seconds=5.0)
        self.name = name
        self.peer_id = f"peer-{name}"
        self.worker_id = self.identity.worker_id


@dataclass
class Network:
    address: str
    sessions: sessionmaker[Session]
    data_dir: Path

    def join(self, name: str, certified: bool = False) -> Participant:
        """Register a volunteer, or a worker GENCI certifies (trust class institution: a validator)."""
        worker = Participant(self.address, name)
        certificate = (certify("GENCI", GENCI, worker.identity.public_key, "institution", int(time.time()) + 3600)
                       .to_bytes() if certified else b"")
        worker.register(name, "GENCI" if certified else "", CPU, certificate)
        return worker


@pytest.fixture
def network(tmp_path: Path, corpus_dir: Path) -> Iterator[Network]:
    """An in-process coordinator service on a real gRPC server, whose draws sample every kept report."""
    database_url = sqlite_url(tmp_path / "coordinator.db")
    sessions = session_factory(open_engine(database_url))
    manifest = Manifest.load(corpus_dir / "manifest.json")
    load_manifest(sessions, manifest)
    institution_key = certify("GENCI", GENCI, b"\0" * 32, "institution", 0).institution_key
    settings = CoordinatorSettings(data_dir=corpus_dir, database_url=database_url,
                                   run=RunSettings(lease_seconds=30, seq_len=64, batch_size=2, inner_steps=4),
                                   admission=AdmissionSettings(institutions={"GENCI": institution_key}))
    run = settings.run
    # No idle stake: a registered validator that leases nothing must not hold the test's rounds open.
    scheduler = Scheduler(sessions, lease_seconds=run.lease_seconds, total_rounds=run.total_rounds,
                          terms=round_terms(run, None), limits=replace(lease_limits(run), idle_stake=0),
                          sampler=Sampler(run.verify_fraction, draw=ALWAYS))
    verifier = RequestVerifier()
    service = CoordinatorService(sessions, scheduler, verifier, run, build_run_config(settings, manifest, []),
                                 CorpusFiles(corpus_dir, manifest),
                                 admission=Admission.for_run(settings.admission, verifier, None, scheduler.current_round))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=SERVER_OPTIONS)
    port = server.add_insecure_port("127.0.0.1:0")
    server.add_generic_rpc_handlers((service.generic_handler(),))
    server.start()
    yield Network(f"127.0.0.1:{port}", sessions, corpus_dir)
    server.stop(grace=None)


def play_round(round_number: int, workers: list[Participant]) -> dict[str, pb.Lease]:
    """Each worker leases once and reports with a claim, and witnesses every worker's part of its own slice."""
    leases = {w.name: w.acquire_lease(256, round_number, w.peer_id).lease for w in workers}
    for index, worker in enumerate(workers):
        lease = leases[worker.name]
        seen = [witness(sender.peer_id, start=100 * index, end=100 * index + 100) for sender in workers]
        worker.complete_round(pb.CompleteRoundRequest(
            round=round_number, leases=[pb.LeaseUsage(lease_id=lease.lease_id, tokens_consumed=lease.end - lease.start)],
            loss=2.0, pseudo_gradient_digest="d" * 64, params_digest=f"{round_number:064d}", group_size=len(workers),
            claim=claim(worker.name.ljust(64, "0")), witnesses=seen,
        ), stop=lambda: True)  # pending until the last report: sent once here, decided by the last one
    return leases


def refused(call, *args) -> CoordinatorRefused:  # type: ignore[no-untyped-def]
    with pytest.raises(CoordinatorRefused) as caught:
        call(*args)
    return caught.value


def verdict(check_id: int, outcome: int, reason: str = "") -> pb.VerdictRequest:
    return pb.VerdictRequest(check_id=check_id, outcome=outcome, reason=reason, exact=outcome == pb.VerdictRequest.PASSED,
                             cosine=1.0 if outcome == pb.VerdictRequest.PASSED else -0.9, norm_ratio=1.0)


def credit(network: Network, worker: Participant) -> dict[int, set[str]]:
    """The worker's lineage: round -> verification states."""
    with network.sessions() as session:
        rows = session.execute(select(LineageRecord.round, LineageRecord.verification)
                               .where(LineageRecord.worker_id == worker.worker_id)).all()
    found: dict[int, set[str]] = {}
    for round_number, state in rows:
        found.setdefault(round_number, set()).add(state)
    return found


def test_a_certified_validator_takes_a_sampled_check_with_what_it_needs_to_replay_it(network: Network) -> None:
    a, b, c = (network.join(name) for name in "abc")
    config = a.run_config()
    assert (config.aggregation, config.verify_fraction, config.fresh_inner_optimizer) == ("clipped_mean", 0.025, True)
    leases = play_round(0, [a, b, c])
    error = refused(c.take_check)
    assert error.code == grpc.StatusCode.PERMISSION_DENIED and "validators need an institution certificate" in error.details

    validator = network.join("lab", certified=True)
    first = validator.take_check()
    assert (first.worker_id, first.round, first.start_params_digest) == (a.worker_id, 0, "")
    granted = leases["a"]
    assert [(x.lease_id, x.shard_id, x.start, x.end, x.round) for x in first.leases] == [
        (granted.lease_id, granted.shard_id, granted.start, granted.end, 0)]
    assert [(u.lease_id, u.tokens_consumed) for u in first.usage] == [(granted.lease_id, granted.end - granted.start)]
    assert first.claim == claim("a".ljust(64, "0"))
    # What b and c witnessed of a's part of their slices; a's witness about itself is not sent.
    assert [(w.sender_peer_id, w.start) for w in first.witnesses] == [("peer-a", 100), ("peer-a", 200)]
    assert list(first.witness_classes) == ["volunteer", "volunteer"]
    assert validator.take_check() == first  # asking again (a lost reply) returns the check it holds

    validator.submit_verdict(verdict(first.check_id, pb.VerdictRequest.PASSED))
    nxt = validator.take_check()
    assert nxt.worker_id == b.worker_id
    play_round(1, [a, b, c])  # round 1's checks start from what round 0 kept
    validator.submit_verdict(verdict(nxt.check_id, pb.VerdictRequest.PASSED))
    validator.submit_verdict(verdict(validator.take_check().check_id, pb.VerdictRequest.PASSED))  # c's, round 0
    assert validator.take_check().start_params_digest == f"{0:064d}"


def test_a_passed_verdict_credits_the_round_and_a_failed_one_quarantines_the_worker(network: Network) -> None:
    a, b, c = network.join("a", certified=True), network.join("b"), network.join("c")  # a trains for GENCI
    validator, other = network.join("lab", certified=True), network.join("lab-2", certified=True)
    round_0 = play_round(0, [a, b, c])
    check_a = validator.take_check()
    error = refused(other.submit_verdict, verdict(check_a.check_id, pb.VerdictRequest.FAILED, "not mine to give"))
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION and "assigned to another validator" in error.details
    validator.submit_verdict(verdict(check_a.check_id, pb.VerdictRequest.PASSED))
    validator.submit_verdict(verdict(check_a.check_id, pb.VerdictRequest.PASSED))  # a resend: harmless
    error = refused(validator.submit_verdict, verdict(check_a.check_id, pb.VerdictRequest.FAILED))
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION and "decided already (passed)" in error.details
    assert credit(network, a) == {0: {"verified"}}

    # Round 1: b reports (pending: a's and c's leases are out), then a check of its round 0 fails.
    leases = {x.name: x.acquire_lease(256, 1, x.peer_id).lease for x in (a, b, c)}
    report_b = pb.CompleteRoundRequest(round=1, leases=[pb.LeaseUsage(lease_id=leases["b"].lease_id, tokens_consumed=64)],
                                       loss=2.0, pseudo_gradient_digest="d" * 64, params_digest="1" * 64, group_size=3,
                                       claim=claim())
    assert b.complete_round(report_b, stop=lambda: True).pending
    check_b = validator.take_check()
    assert check_b.worker_id == b.worker_id
    validator.submit_verdict(verdict(check_b.check_id, pb.VerdictRequest.FAILED, "replay: cosine -0.90 to the claim"))

    assert b.acquire_lease(256, 1, b.peer_id).status == pb.AcquireLeaseReply.QUARANTINED
    # Its heartbeats say so too (within the half second the service shares one reading): a worker
    # trying to adopt the swarm's state learns there that it should stop instead.
    wait_for(lambda: b.heartbeat(1, 2.0, 100.0).quarantined, 5.0, "b's heartbeat to say it is quarantined")
    assert not a.heartbeat(1, 2.0, 100.0).quarantined
    error = refused(b.complete_round, report_b)
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert (f"worker {b.worker_id[:12]} is quarantined since round 0: replay: cosine -0.90 to the claim; "
            "its reports are not credited") in error.details
    with network.sessions() as session:
        lease = session.get(Lease, leases["b"].lease_id)
        assert lease.state == "released"
        assert session.get(TokenRange, lease.range_id).state == "pool"
        assert session.scalars(select(FiledReport.outcome).where(FiledReport.round == 1)).all() == ["quarantined"]
    assert credit(network, b) == {0: {"rejected"}}

    for x in (a, c):  # the round is decided without b
        lease = leases[x.name]
        x.complete_round(pb.CompleteRoundRequest(
            round=1, leases=[pb.LeaseUsage(lease_id=lease.lease_id, tokens_consumed=lease.end - lease.start)], loss=2.0,
            pseudo_gradient_digest="d" * 64, params_digest="1" * 64, group_size=2, claim=claim()), stop=lambda: True)
    wait_for(lambda: a.heartbeat(1, 2.0, 1.0).current_round == 2, 5.0, "round 1 decided, as heartbeats read it")
    assert credit(network, b) == {0: {"rejected"}}  # nothing of round 1
    assert accounting_problems(network.sessions) == []
    audit = verify_run(network.sessions, network.data_dir, [])
    assert audit.problems == []
    assert len(audit.findings) == 1 and f"({b.worker_id}, independent) is quarantined: check " \
        f"{check_b.check_id} (sampled) of its round 0 failed: replay: cosine -0.90 to the claim" in audit.findings[0]
    tokens = {name: lease.end - lease.start for name, lease in round_0.items()}
    assert audit.credit["verified"] == tokens["a"] and audit.credit["rejected"] == tokens["b"]

    # The model card tells the three apart, per institution: a's round 0 is GENCI's verified tokens.
    root = Manifest.load(network.data_dir / "manifest.json").root_hash()
    checkpoint = Checkpoint(network.data_dir, completed_round=1, next_round=2, run_id="run", lineage_head=0,
                            params_digest="1" * 64, config_version="genesis", run_config={"corpus_root_hash": root},
                            saved_at=time.time() + 1)
    card = build_card(network.sessions, checkpoint, network.data_dir)
    assert card["institutions"]["GENCI"]["verification"]["verified"] == tokens["a"]
    assert card["volunteers"]["verification"]["rejected"] == tokens["b"]
    assert sum(card["verification"].values()) == card["tokens"] and card["verification"]["unverified"] > 0
    assert [w["name"] for w in card["workers"] if w["quarantined"]] == ["b"]
    markdown = card_markdown(card)
    assert "| verified by replay | unverified | rejected |" in markdown and "| b (quarantined) |" in markdown


def test_an_inconclusive_check_goes_to_another_validator_once_then_stays_unverified(network: Network) -> None:
    a, b = network.join("a"), network.join("b")
    first, second = network.join("lab", certified=True), network.join("lab-2", certified=True)
    play_round(0, [a, b])
    check = first.take_check()
    first.submit_verdict(verdict(check.check_id, pb.VerdictRequest.INCONCLUSIVE, "no state for round -1"))
    first.submit_verdict(verdict(check.check_id, pb.VerdictRequest.INCONCLUSIVE, "no state for round -1"))  # resent
    assert first.take_check().check_id != check.check_id  # not back to the validator that could not replay it
    again = second.take_check()
    assert again.check_id == check.check_id
    second.submit_verdict(verdict(check.check_id, pb.VerdictRequest.INCONCLUSIVE, "no state either"))
    with network.sessions() as session:
        assert session.get(Check, check.check_id).status == "inconclusive"
    assert credit(network, a) == {0: {"unverified"}}
    assert second.take_check().check_id == 0  # the other check is first's; none left for second
    assert second.take_check().retry_after_ms > 0


def test_a_report_filed_while_its_worker_was_being_quarantined_stakes_nothing(store) -> None:
    scheduler = book_scheduler(store, NEVER)
    leases = {w: scheduler.acquire(w, 200, 0).lease for w in ("v1", "v2")}
    assert scheduler.complete_round("v1", filed_report(leases["v1"], evidence(), digest="1" * 64)).pending
    with store.begin() as session:  # another coordinator process's verdict, committed after v1 filed
        worker = session.get(Worker, "v1")
        worker.quarantined_at, worker.quarantine_round, worker.quarantine_reason = 1.0, 0, "replay disagreed"
    assert scheduler.complete_round("v2", filed_report(leases["v2"], evidence(), digest="2" * 64)).accepted
    assert scheduler.kept_params_digest(0) == "2" * 64  # v1's stake, as large as v2's, did not count
    with store() as session:
        assert session.get(Lease, leases["v1"].id).state == "released"
    assert accounting_problems(store) == []


def test_a_convicted_validator_gives_its_checks_back_and_its_verdicts_are_refused(store) -> None:
    scheduler = book_scheduler(store, ALWAYS)
    leases = {w: scheduler.acquire(w, 200, 0).lease for w in ("v1", "lab")}
    for worker in ("v1", "lab"):
        scheduler.complete_round(worker, filed_report(leases[worker], evidence()))
    held = scheduler.take_check("lab")
    assert held.check.worker_id == "v1"  # never its own
    about_lab = scheduler.take_check("lab2")
    scheduler.submit_verdict("lab2", Verdict(about_lab.check.id, "failed", "replay: loss after 9.1, claimed 2.5"))
    with pytest.raises(VerdictRefused, match="worker lab is quarantined since round 0: its verdicts are not taken"):
        scheduler.submit_verdict("lab", Verdict(held.check.id, "passed"))
    with pytest.raises(NotAValidator, match="quarantined"):
        scheduler.take_check("lab")
    assert scheduler.take_check("lab2").check.id == held.check.id


def test_a_rewound_rounds_check_waits_for_the_round_to_be_kept_again(store) -> None:
    scheduler = book_scheduler(store, ALWAYS)

    def play_round_0() -> dict[str, Lease]:
        leases = {w: scheduler.acquire(w, 200, 0).lease for w in ("v1", "v2")}
        for worker in ("v1", "v2"):
            scheduler.complete_round(worker, filed_report(leases[worker], evidence()))
        return leases

    play_round_0()
    assert scheduler.take_check("lab").check.worker_id == "v1"  # lab holds it through the rewind
    rewind(store, to_round=0, now=2e9)  # round 0's reports are deleted; its checks stay
    assert scheduler.current_round() == 0 and scheduler.take_check("lab2") is None  # v2's: nothing to replay now
    redone = play_round_0()
    assert set(checks_of(store)) == {("v1", 0), ("v2", 0)}  # not opened twice
    again = scheduler.take_check("lab2")
    lease = redone["v2"]
    assert again.check.worker_id == "v2" and again.usage == [(lease.id, lease.end - lease.start)]  # the redone report


def test_a_maintainers_retrain_decision_returns_a_workers_unverified_tokens_to_the_pool_once(store) -> None:
    scheduler = book_scheduler(store, NEVER)  # nothing sampled: v1's rounds stay unverified
    for round_number in range(2):
        leases = {w: scheduler.acquire(w, 200, round_number).lease for w in ("v1", "v2")}
        for worker in ("v1", "v2"):
            scheduler.complete_round(worker, filed_report(leases[worker], evidence(), round_number=round_number))
    with store() as session:
        v1_tokens = sum(r.end - r.start for r in session.scalars(select(LineageRecord).where(LineageRecord.worker_id == "v1")))
    assert scheduler.retrain({"v1"}) == v1_tokens > 0
    assert scheduler.retrain({"v1"}) == 0  # decided once, applied once
    with store() as session:
        records = session.scalars(select(LineageRecord)).all()
        assert {r.worker_id for r in records if r.rewound_at is not None} == {"v1"}
        assert all(r.rewound_at is None for r in records if r.worker_id == "v2")
        assert {session.get(Lease, r.lease_id).state for r in records if r.worker_id == "v1"} == {"rewound"}
    assert accounting_problems(store) == []
    regranted = scheduler.acquire("v2", 10_000, 2).lease  # the returned tokens are leased again
    assert regranted is not None
