"""Governance enforced by real processes: a vote changes the training config, and every worker switches at once.

Workers join a governed run only with its genesis pinned, and are credited to an
institution only with a certificate from one its genesis admits by key.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from coordinator.config import RunSettings
from coordinator.store import Contribution, Lease, Round, Worker
from essaim.processes import essaim_command, start_role
from governance.documents import digest, generate_key, load_key, make_genesis, make_proposal, make_vote
from governance.ledger import Ledger
from model.checkpoints import latest_checkpoint, read_checkpoint
from model.presets import build_model
from model.shards import Manifest
from protocol.certificates import certify
from protocol.identity import Identity
from support import wait_all, wait_for

pytestmark = pytest.mark.e2e

POLICY = {"quorum": 2, "threshold": 2, "voting_period_rounds": 3, "activation_delay_rounds": 2}


@pytest.fixture
def maintainers(tmp_path: Path) -> dict:
    """The run's maintainers' keys, and its institutions' ("Inria", "GENCI")."""
    public = {name: generate_key(tmp_path / f"{name}.key") for name in ("alice", "bob", "carol", "Inria", "GENCI")}
    return {name: (public[name], load_key(tmp_path / f"{name}.key")) for name in public}


def new_ledger(maintainers: dict, path: Path) -> Ledger:
    genesis = make_genesis("e2e", {n: maintainers[n][0] for n in ("alice", "bob", "carol")}, POLICY,
                           {"inner_lr": 0.003}, {n: maintainers[n][0] for n in ("Inria", "GENCI")})
    ledger = Ledger(genesis)
    ledger.save(path)
    return ledger


def certified(maintainers: dict, tmp_path: Path, worker: str, institution: str, trust_class: str) -> list[str]:
    """The options of a worker its institution certified: its identity and its certificate."""
    identity = Identity.load_or_create(tmp_path / f"{worker}.key")
    certificate = certify(institution, maintainers[institution][1], identity.public_key, trust_class,
                          int(time.time()) + 3600)
    (tmp_path / f"{worker}.cert").write_bytes(certificate.to_bytes())
    return ["--identity", str(tmp_path / f"{worker}.key"), "--certificate", str(tmp_path / f"{worker}.cert")]


def test_a_vote_changes_the_training_config_and_every_worker_switches_at_the_same_round(
    start_coordinator, maintainers: dict, tmp_path: Path, corpus_dir: Path
) -> None:
    path = tmp_path / "ledger.json"
    ledger = new_ledger(maintainers, path)
    coordinator = start_coordinator(
        governance=path, total_rounds=6, target_group_size=2, inner_steps=30, batch_size=4, seq_len=64,
        matchmaking_seconds=5.0, heartbeat_seconds=1,
    )
    genesis_hash = digest(ledger.genesis)
    join = f"essaim worker join --coordinator {coordinator.address} --genesis {genesis_hash}"
    assert f"workers join with: {join}" in coordinator.log.read_text()
    assert json.loads((tmp_path / "ready.json").read_text())["join"] == join

    # A worker that does not pin the genesis is refused, told the exact --genesis and where it is published; it
    # typed an admitted institution without a certificate, so it was registered as a volunteer of none.
    unpinned = subprocess.run(
        essaim_command("worker", "join", "--coordinator", coordinator.address, "--institution", "Inria",
                       "--name", "unpinned", "--identity", str(tmp_path / "unpinned.key")),
        capture_output=True, text=True, timeout=120)
    assert unpinned.returncode == 2 and f"join again with --genesis {genesis_hash}" in unpinned.stderr
    assert "the join line the run publishes" in unpinned.stderr
    assert "institution 'Inria' not credited: it presented no certificate" in unpinned.stderr
    pinned_elsewhere = subprocess.run(
        essaim_command("worker", "join", "--coordinator", coordinator.address, "--genesis", "0" * 64,
                       *certified(maintainers, tmp_path, "pinned", "Inria", "institution")),
        capture_output=True, text=True, timeout=120)
    assert pinned_elsewhere.returncode == 2 and "not the pinned" in pinned_elsewhere.stderr

    workers = [
        start_role(["worker", "join", "--coordinator", coordinator.address, "--genesis", genesis_hash,
                    "--name", f"w{i}", "--checkpoint-dir", str(tmp_path / f"ckpt{i}"),
                    *certified(maintainers, tmp_path, f"w{i}", institution, trust_class)],
                   tmp_path / f"w{i}.log", env={"OMP_NUM_THREADS": "1"})
        for i, (institution, trust_class) in enumerate([("Inria", "institution"), ("GENCI", "hpc")])
    ]
    sessions = coordinator.sessions()
    with sessions() as session:
        registered = {w.name: (w.institution, w.trust_class) for w in session.scalars(select(Worker))}
    assert registered["unpinned"] == ("independent", "volunteer")

    def current_round() -> int:
        with sessions() as session:
            last = session.scalar(select(func.max(Round.number)))
        return 0 if last is None else last + 1

    wait_for(lambda: current_round() >= 1, 180, "round 0 to complete")
    # The maintainers vote, each signing the current round on their own; the operator appends the signed files.
    change = {"config": {"inner_lr": 0.0005, "inner_steps": 45, "compression": "8bit", "aggregation": "trimmed_mean"}}
    decided_at = current_round()
    proposal = make_proposal(genesis_hash, "alice", change, "calmer, longer, lighter rounds", maintainers["alice"][1],
                             round_=decided_at)
    ledger.append(proposal, decided_at)
    for voter in ("bob", "carol"):
        ledger.append(make_vote(genesis_hash, proposal, voter, "yes", maintainers[voter][1], round_=decided_at),
                      decided_at)
    ledger.save(path)
    (accepted,) = ledger.state.accepted
    activation = accepted.activation_round
    assert activation == decided_at + 2  # the passing vote's signed round + the activation delay

    wait_all(workers, timeout=300)
    logs = [(tmp_path / f"w{i}.log").read_text() for i in range(2)]
    assert [w.returncode for w in workers] == [0, 0], [log[-3000:] for log in logs]
    for log in logs:
        switches = [(int(r), float(lr)) for r, lr in re.findall(r"round (\d+): learning rates inner ([\d.e-]+)", log)]
        assert switches[0][1] == 0.003  # the genesis config
        assert switches[-1] == (activation, 0.0005), switches  # both switch at the activation round, not before
        assert re.findall(r"round (\d+): compression (\w+)", log) == [(str(activation), "8bit")]
        assert re.findall(r"round (\d+): aggregation (\w+)", log) == [(str(activation), "trimmed_mean")]
    assert "ledger head" in (tmp_path / "coordinator.log").read_text()

    # The coordinator sizes leases from the voted inner_steps (a round's tokens over 4 leases) from that round on.
    with sessions() as session:
        leases = session.execute(select(Lease.round, Lease.end - Lease.start)).all()
        grouped = session.execute(select(Contribution.round, Contribution.bytes_sent)
                                  .where(Contribution.group_size == 2)).all()
    assert max(size for round_, size in leases if round_ < activation) == 30 * 4 * 64 // 4
    assert max(size for round_, size in leases if round_ >= activation) == 45 * 4 * 64 // 4
    # Averaged in 8 bits from that round on: a peer of two sends about half the payload and gets half back.
    vocab_size = Manifest.load(corpus_dir / "manifest.json").vocab_size
    payload = sum(p.numel() * 4 for p in build_model(RunSettings().model_preset, vocab_size, 0).parameters())
    widths = [(round_ >= activation, sent / payload) for round_, sent in grouped]
    assert any(after for after, _ in widths), grouped
    assert all(0.2 < width < 0.3 if after else 0.9 < width < 1.2 for after, width in widths), widths

    # The checkpoint and its card name the configs that trained it, as the ledger has them.
    with sessions() as session:
        registered = {w.name: (w.institution, w.trust_class) for w in session.scalars(select(Worker))}
    assert (registered["w0"], registered["w1"]) == (("Inria", "institution"), ("GENCI", "hpc"))
    checkpoint = latest_checkpoint(tmp_path / "ckpt0")
    proposal_id = accepted.proposal
    assert read_checkpoint(checkpoint).config_version == proposal_id
    card_command = ["audit", "card", str(checkpoint), "--data", str(corpus_dir), "--database",
                    coordinator.database_url, "--out", str(tmp_path / "card")]
    made = subprocess.run(essaim_command(*card_command, "--governance", str(path)), capture_output=True, text=True,
                          timeout=120)
    assert made.returncode == 0, made.stderr
    card = json.loads((tmp_path / "card" / "model_card.json").read_text())
    assert card["configs"]["versions"] == sorted([genesis_hash, proposal_id])
    assert set(card["institutions"]) == {"Inria", "GENCI"}  # both certified by keys the genesis admits
    versions = card["configs"]["governance"]["versions"]
    assert versions[genesis_hash] == {"genesis": True, "config": {"inner_lr": 0.003}}
    assert versions[proposal_id] == {"activation_round": activation, "change": change,
                                     "reason": "calmer, longer, lighter rounds", "author": "alice",
                                     "yes": ["bob", "carol"], "no": []}
    assert f"`{proposal_id[:16]}` from round {activation}" in (tmp_path / "card" / "MODEL_CARD.md").read_text()
    new_ledger(maintainers, tmp_path / "other.json")  # the same genesis, but a history without this vote
    other_run = subprocess.run(essaim_command(*card_command, "--governance", str(tmp_path / "other.json")),
                               capture_output=True, text=True, timeout=120)
    assert other_run.returncode == 2 and "never accepted" in other_run.stderr


def test_a_coordinator_refuses_to_start_on_a_tampered_ledger(maintainers: dict, tmp_path: Path, corpus_dir: Path) -> None:
    path = tmp_path / "ledger.json"
    ledger = new_ledger(maintainers, path)
    proposal = make_proposal(digest(ledger.genesis), "alice", {"config": {"inner_lr": 0.0005}}, "why",
                             maintainers["alice"][1], round_=1)
    ledger.append(proposal, 1)
    ledger.save(path)
    document = json.loads(path.read_text())
    document["entries"][0]["item"]["change"]["config"]["inner_lr"] = 0.5
    path.write_text(json.dumps(document))
    started = start_role(["coordinator", "serve", "--data", str(corpus_dir), "--port", "0", "--governance", str(path),
                          "--database", f"sqlite:///{tmp_path / 'c.db'}"], tmp_path / "c.log")
    assert started.wait(timeout=120) == 2
    assert "ledger entry 0" in (tmp_path / "c.log").read_text()
