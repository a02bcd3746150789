"""Held-out figures reported with CompleteRound: refused if malformed, kept with the round, shown by cards and audits."""

from __future__ import annotations

import json
import math
from concurrent import futures
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from coordinator.admission import Admission
from coordinator.card import build_card, card_markdown
from coordinator.config import CoordinatorSettings, RunSettings
from coordinator.corpus_files import CorpusFiles
from coordinator.evaluations import checkpoint_evaluations, evaluation_problems, record_evaluation
from coordinator.rewind import rewind
from coordinator.round_terms import round_terms
from coordinator.rounds import RoundReport
from coordinator.scheduler import Scheduler
from coordinator.server import build_run_config, lease_limits
from coordinator.service import CoordinatorService
from coordinator.store import Evaluation, FiledReport, load_manifest, open_engine, session_factory, sqlite_url
from model.checkpoints import Checkpoint
from model.eval_figures import EvalFigure, evaluator_of
from model.shards import Manifest
from protocol import essaim_pb2 as pb
from protocol.auth import RequestVerifier
from protocol.credentials import sign_statement
from protocol.identity import Identity
from protocol.limits import SERVER_OPTIONS
from worker.capabilities import Capabilities
from worker.client import CoordinatorClient, CoordinatorRefused

CPU = Capabilities("cpu", 0, "volunteer", 0.0, "", 0.0)
DIGEST = [f"{n}" * 64 for n in range(10)]  # the parameters each round keeps


@dataclass
class Network:
    address: str
    sessions: sessionmaker[Session]
    run_id: str


@pytest.fixture
def network(tmp_path: Path, corpus_dir: Path) -> Iterator[Network]:
    """An in-process coordinator service on a real gRPC server; a group's report decides a round within 0.2 s."""
    database_url = sqlite_url(tmp_path / "coordinator.db")
    sessions = session_factory(open_engine(database_url))
    manifest = Manifest.load(corpus_dir / "manifest.json")
    load_manifest(sessions, manifest)
    run = RunSettings(lease_seconds=30, seq_len=64, batch_size=2, inner_steps=4, verify_fraction=0, eval_every_rounds=1,
                      bounds={"decision_seconds": 0.2})
    settings = CoordinatorSettings(data_dir=corpus_dir, database_url=database_url, run=run)
    scheduler = Scheduler(sessions, lease_seconds=run.lease_seconds, total_rounds=run.total_rounds,
                          terms=round_terms(run, None), limits=replace(lease_limits(run), idle_stake=0))
    verifier = RequestVerifier()
    run_config = build_run_config(settings, manifest, [])
    assert run_config.eval_every_rounds == 1
    service = CoordinatorService(sessions, scheduler, verifier, run, run_config, CorpusFiles(corpus_dir, manifest),
                                 admission=Admission.for_run(settings.admission, verifier, None, scheduler.current_round))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=SERVER_OPTIONS)
    port = server.add_insecure_port("127.0.0.1:0")
    server.add_generic_rpc_handlers((service.generic_handler(),))
    server.start()
    yield Network(f"127.0.0.1:{port}", sessions, run_config.run_id)
    server.stop(grace=None)


def join(network: Network, name: str) -> CoordinatorClient:
    client = CoordinatorClient(network.address, Identity.generate(), retry_seconds=5.0)
    client.register(name, "", CPU)
    return client


def evaluation(digest: str, bits: float) -> pb.Evaluation:
    """An overall figure and one per language, with `bits` bits per byte overall."""
    def figure(group: str, name: str, tokens: int, text_bytes: int, bits_per_byte: float) -> pb.EvalFigure:
        return pb.EvalFigure(group=group, name=name, tokens=tokens, bytes=text_bytes, bits_per_byte=bits_per_byte,
                             loss=bits_per_byte * text_bytes * math.log(2) / tokens)
    return pb.Evaluation(params_digest=digest, figures=[figure("all", "all", 600, 1000, bits),
                                                        figure("language", "fr", 300, 520, bits + 0.1)])


def report(lease: pb.Lease, digest: str, group: int, **fields) -> pb.CompleteRoundRequest:  # type: ignore[no-untyped-def]
    """A report of the whole lease, with `fields` (an evaluation, member statements)."""
    return pb.CompleteRoundRequest(
        round=lease.round, leases=[pb.LeaseUsage(lease_id=lease.lease_id, tokens_consumed=lease.end - lease.start)],
        loss=2.0, pseudo_gradient_digest="d" * 64, params_digest=digest, group_size=group, **fields)


def statements(network: Network, workers: dict[str, CoordinatorClient], leases: dict[str, pb.Lease],
               names: tuple[str, ...]) -> list[bytes]:
    """The group's signed member statements: each member's usage of its whole lease."""
    return [sign_statement(workers[name].identity, pb.MemberStatement(
        run_id=network.run_id, worker_id=workers[name].identity.worker_id, round=leases[name].round, loss=2.0,
        leases=[pb.LeaseUsage(lease_id=leases[name].lease_id, tokens_consumed=leases[name].end - leases[name].start)]))
        for name in names]


def stored(network: Network) -> dict[tuple[int, str, str], tuple[float, str]]:
    with network.sessions() as session:
        return {(e.round, e.group, e.name): (e.bits_per_byte, e.worker_id) for e in session.scalars(select(Evaluation))}


def test_malformed_figures_are_refused_and_change_nothing(network: Network) -> None:
    worker = join(network, "w")
    lease = worker.acquire_lease(256, 0, "peer-w").lease
    good = evaluation(DIGEST[0], 3.0)
    nan, negative, inconsistent, twice = (pb.Evaluation() for _ in range(4))
    for bad in (nan, negative, inconsistent, twice):
        bad.CopyFrom(good)
    nan.figures[0].loss = float("nan")
    negative.figures[1].bits_per_byte, negative.figures[1].loss = -1.0, -1.0
    inconsistent.figures[0].bits_per_byte = 2.0
    twice.figures[1].CopyFrom(twice.figures[0])
    cases = [(nan, "figure \\('all', 'all'\\): loss nan and bits_per_byte 3.0 must be finite and >= 0"),
             (negative, "figure \\('language', 'fr'\\): loss -1.0 and bits_per_byte -1.0 must be finite"),
             (inconsistent, "bits_per_byte 2.0 is not loss x tokens / \\(bytes x ln 2\\)"),
             (twice, "gives a \\(group, name\\) twice"),
             (evaluation(DIGEST[1], 3.0), "the evaluation is of parameters '1111", )]
    for bad, reason in cases:
        with pytest.raises(CoordinatorRefused, match=reason) as refused:
            worker.complete_round(report(lease, DIGEST[0], 1, evaluation=bad))
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with network.sessions() as session:
        assert session.scalar(select(func.count(FiledReport.id))) == 0
    assert stored(network) == {}


def test_the_first_kept_report_s_figures_are_stored_and_enter_cards_and_audits(network: Network, corpus_dir: Path,
                                                                                tmp_path: Path) -> None:
    a, b, loner = (join(network, name) for name in ("a", "b", "loner"))
    workers = {"a": a, "b": b, "loner": loner}
    leases = {name: w.acquire_lease(256, 0, f"peer-{name}").lease for name, w in workers.items()}
    # Round 0: a and b averaged (DIGEST[0]) and both send figures; only the member their statements designate
    # is kept, though the other reports first. The loner's parameters hold fewer tokens: not kept.
    group = statements(network, workers, leases, ("a", "b"))
    evaluator = evaluator_of(0, [a.identity.worker_id, b.identity.worker_id])
    chosen, other = (a, b) if evaluator == a.identity.worker_id else (b, a)
    chosen_lease, other_lease = (leases[n] for n in (("a", "b") if chosen is a else ("b", "a")))
    first = other.complete_round(report(other_lease, DIGEST[0], 2, evaluation=evaluation(DIGEST[0], 3.5),
                                        member_statements=group), stop=lambda: True)
    assert first.pending  # the chosen member's lease is still out
    loner.complete_round(report(leases["loner"], "e" * 64, 1, evaluation=evaluation("e" * 64, 9.0)),
                         stop=lambda: True)
    assert chosen.complete_round(report(chosen_lease, DIGEST[0], 2, evaluation=evaluation(DIGEST[0], 3.0),
                                        member_statements=group)).accepted
    assert stored(network) == {(0, "all", "all"): (3.0, evaluator), (0, "language", "fr"): (3.1, evaluator)}

    # Round 1: a reports for both (b's signed statement vouches for it); b's own report, with the figures,
    # arrives after the round was decided without it, and is kept late. Sent again (its reply lost), with
    # other figures, it changes nothing: the round's first figures stay.
    leases = {name: w.acquire_lease(256, 1, f"peer-{name}").lease for name, w in (("a", a), ("b", b))}
    group = statements(network, workers, leases, ("a", "b"))
    assert a.complete_round(report(leases["a"], DIGEST[1], 2, member_statements=group)).accepted
    assert (1, "all", "all") not in stored(network)
    assert b.complete_round(report(leases["b"], DIGEST[1], 2, evaluation=evaluation(DIGEST[1], 2.25))).accepted
    assert stored(network)[(1, "all", "all")] == (2.25, b.identity.worker_id)
    assert b.complete_round(report(leases["b"], DIGEST[1], 2, evaluation=evaluation(DIGEST[1], 9.5))).accepted
    assert stored(network)[(1, "all", "all")] == (2.25, b.identity.worker_id)

    manifest = Manifest.load(corpus_dir / "manifest.json")
    checkpoint = Checkpoint(tmp_path / "round-000001", 1, 2, network.run_id, 0, DIGEST[1], "v",
                            {"corpus_root_hash": manifest.root_hash(), "model_preset": "tiny"}, 0.0)
    card = build_card(network.sessions, checkpoint, corpus_dir)
    overall = card["evaluation"]["figures"][0]
    assert (card["evaluation"]["round"], card["evaluation"]["of_these_weights"]) == (1, True)
    assert (overall["name"], overall["bits_per_byte"], overall["first_round"]) == ("all", 2.25, 0)
    assert overall["change_bits_per_byte"] == pytest.approx(-0.75)
    assert "| all | all | 600 | " in card_markdown(card) and "| 3.000 (round 0) | -0.750 |" in card_markdown(card)
    earlier = build_card(network.sessions, replace(checkpoint, completed_round=0, params_digest=DIGEST[0]), corpus_dir)
    assert earlier["evaluation"]["round"] == 0 and earlier["evaluation"]["figures"][0]["change_bits_per_byte"] == 0

    checkpoint.path.mkdir()
    (checkpoint.path / "checkpoint.json").write_text(json.dumps({
        "completed_round": 1, "next_round": 2, "run_id": network.run_id, "lineage_head": 0, "params_digest": DIGEST[1],
        "config_version": "v", "run_config": checkpoint.run_config}))
    with network.sessions() as session:
        assert evaluation_problems(session) == []
        line, = checkpoint_evaluations(session, [checkpoint.path])
    assert "held-out evaluation of its weights: 2.250 bits per byte" in line and "-0.750 bits per byte since round 0" in line
    with network.sessions.begin() as session:  # figures that do not belong to the parameters the round kept
        session.execute(update(Evaluation).where(Evaluation.round == 0).values(params_digest="f" * 64))
    with network.sessions() as session:
        assert evaluation_problems(session) == [
            f"the evaluation of round 0 is of parameters {'f' * 16}, but the round kept {DIGEST[0][:16]}"]

    rewind(network.sessions, 1)  # round 1 is forgotten: so are its figures, which its redo will report again
    assert {key[0] for key in stored(network)} == {0}


def test_a_round_keeps_its_first_figures_on_every_database(database_url: str) -> None:
    sessions = session_factory(open_engine(database_url))
    kept = RoundReport(round=3, leases=(), loss=2.0, pseudo_gradient_digest="d" * 64, params_digest=DIGEST[3],
                       group_size=1, evaluation=(EvalFigure("all", "all", 10, 20, 1.0, 10 / (20 * math.log(2))),))
    later = replace(kept, evaluation=(EvalFigure("all", "all", 10, 20, 2.0, 20 / (20 * math.log(2))),
                                      EvalFigure("source", "wiki", 10, 20, 2.0, 20 / (20 * math.log(2)))))
    for report_, worker in ((kept, "w1"), (later, "w2")):
        with sessions.begin() as session:
            record_evaluation(session, worker, report_, 0.0)
    with sessions() as session:
        rows = {(e.group, e.name): (e.loss, e.worker_id) for e in session.scalars(select(Evaluation))}
    assert rows == {("all", "all"): (1.0, "w1"), ("source", "wiki"): (2.0, "w2")}
