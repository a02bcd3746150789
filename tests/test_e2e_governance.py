"""Governance enforced by real processes: a vote changes the training config, and every worker switches at once."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import func, select

from coordinator.config import RunSettings
from coordinator.store import Contribution, Lease, Round
from essaim.processes import essaim_command, start_role
from governance.documents import digest, generate_key, load_key, make_genesis, make_proposal, make_vote
from governance.ledger import Ledger
from model.checkpoints import latest_checkpoint, read_checkpoint
from model.presets import build_model
from model.shards import Manifest
from support import wait_all, wait_for

pytestmark = pytest.mark.e2e

POLICY = {"quorum": 2, "threshold": 2, "voting_period_rounds": 3, "activation_delay_rounds": 2}


@pytest.fixture
def maintainers(tmp_path: Path) -> dict:
    public = {name: generate_key(tmp_path / f"{name}.key") for name in ("alice", "bob", "carol")}
    return {name: (public[name], load_key(tmp_path / f"{name}.key")) for name in public}


def new_ledger(maintainers: dict, path: Path) -> Ledger:
    genesis = make_genesis("e2e", {n: k[0] for n, k in maintainers.items()}, POLICY, {"inner_lr": 0.003},
                           ["Inria", "GENCI"])
    ledger = Ledger(genesis)
    ledger.save(path)
    return ledger


def test_a_vote_changes_the_training_config_and_every_worker_switches_at_the_same_round(
    start_coordinator, maintainers: dict, tmp_path: Path, corpus_dir: Path
) -> None:
    path = tmp_path / "ledger.json"
    ledger = new_ledger(maintainers, path)
    coordinator = start_coordinator(
        governance=path, total_rounds=6, target_group_size=2, inner_steps=30, batch_size=4, seq_len=64,
        matchmaking_seconds=5.0, heartbeat_seconds=1,
    )
    outsider = subprocess.run(
        essaim_command("worker", "join", "--coordinator", coordinator.address, "--institution", "Unknown Corp",
                       "--identity", str(tmp_path / "outsider.key")), capture_output=True, text=True, timeout=120)
    assert outsider.returncode == 2 and "'Unknown Corp' is not admitted" in outsider.stderr
    pinned_elsewhere = subprocess.run(
        essaim_command("worker", "join", "--coordinator", coordinator.address, "--institution", "Inria",
                       "--genesis", "0" * 64, "--identity", str(tmp_path / "pinned.key")),
        capture_output=True, text=True, timeout=120)
    assert pinned_elsewhere.returncode == 2 and "not the pinned" in pinned_elsewhere.stderr

    workers = [
        start_role(["worker", "join", "--coordinator", coordinator.address, "--name", f"w{i}", "--institution",
                    institution, "--identity", str(tmp_path / f"w{i}.key"), "--checkpoint-dir", str(tmp_path / f"ckpt{i}")],
                   tmp_path / f"w{i}.log", env={"OMP_NUM_THREADS": "1"})
        for i, institution in enumerate(["Inria", "GENCI"])
    ]
    sessions = coordinator.sessions()

    def current_round() -> int:
        with sessions() as session:
            last = session.scalar(select(func.max(Round.number)))
        return 0 if last is None else last + 1

    wait_for(lambda: current_round() >= 1, 180, "round 0 to complete")
    # The maintainers vote, each signing on their own; the operator appends and tallies at the current round.
    genesis_hash = digest(ledger.genesis)
    change = {"config": {"inner_lr": 0.0005, "inner_steps": 45, "compression": "8bit"}}
    proposal = make_proposal(genesis_hash, "alice", change, "calmer, longer, lighter rounds", maintainers["alice"][1])
    decided_at = current_round()
    ledger.append(proposal, decided_at)
    for voter in ("bob", "carol"):
        ledger.append(make_vote(genesis_hash, proposal, voter, "yes", maintainers[voter][1]), decided_at)
    (decision,) = ledger.tally(decided_at)
    ledger.save(path)
    activation = decision["item"]["activation_round"]
    assert activation == decided_at + 2

    wait_all(workers, timeout=300)
    logs = [(tmp_path / f"w{i}.log").read_text() for i in range(2)]
    assert [w.returncode for w in workers] == [0, 0], [log[-3000:] for log in logs]
    for log in logs:
        switches = [(int(r), float(lr)) for r, lr in re.findall(r"round (\d+): learning rates inner ([\d.e-]+)", log)]
        assert switches[0][1] == 0.003  # the genesis config
        assert switches[-1] == (activation, 0.0005), switches  # both switch at the activation round, not before
        assert re.findall(r"round (\d+): compression (\w+)", log) == [(str(activation), "8bit")]
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
    checkpoint = latest_checkpoint(tmp_path / "ckpt0")
    proposal_id = decision["item"]["proposal"]
    assert read_checkpoint(checkpoint).config_version == proposal_id
    card_command = ["audit", "card", str(checkpoint), "--data", str(corpus_dir), "--database",
                    coordinator.database_url, "--out", str(tmp_path / "card")]
    made = subprocess.run(essaim_command(*card_command, "--governance", str(path)), capture_output=True, text=True,
                          timeout=120)
    assert made.returncode == 0, made.stderr
    card = json.loads((tmp_path / "card" / "model_card.json").read_text())
    assert card["configs"]["versions"] == sorted([genesis_hash, proposal_id])
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
                             maintainers["alice"][1])
    ledger.append(proposal, 1)
    ledger.save(path)
    document = json.loads(path.read_text())
    document["entries"][0]["item"]["change"]["config"]["inner_lr"] = 0.5
    path.write_text(json.dumps(document))
    started = start_role(["coordinator", "serve", "--data", str(corpus_dir), "--port", "0", "--governance", str(path),
                          "--database", f"sqlite:///{tmp_path / 'c.db'}"], tmp_path / "c.log")
    assert started.wait(timeout=120) == 2
    assert "ledger entry 0" in (tmp_path / "c.log").read_text()
