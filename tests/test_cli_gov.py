"""`essaim gov` as maintainers use it: keys and signatures on their own machines, one ledger file."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from essaim.processes import essaim_command


def gov(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(essaim_command("gov", *args), capture_output=True, text=True, timeout=60)


def test_maintainers_change_the_inner_lr_by_signed_vote_and_bad_input_leaves_the_ledger_unchanged(tmp_path: Path) -> None:
    keys = {name: gov("keygen", str(tmp_path / f"{name}.key")).stdout.strip() for name in ("alice", "bob", "carol", "eve")}
    ledger = tmp_path / "ledger.json"
    made = gov("init", "--ledger", str(ledger), "--run", "lucie-mini", "--quorum", "2", "--threshold", "2",
               "--voting-period", "3", "--activation-delay", "2", "--config", "inner_lr=0.002",
               *(f"--maintainer={n}={keys[n]}" for n in ("alice", "bob", "carol")))
    assert made.returncode == 0, made.stderr
    proposal = tmp_path / "lr.json"
    assert gov("propose", "--ledger", str(ledger), "--key", str(tmp_path / "alice.key"), "--author", "alice",
               "--change", '{"config": {"inner_lr": 0.001}}', "--reason", "loss spikes", "--out", str(proposal)
               ).returncode == 0
    for voter in ("bob", "carol", "eve"):
        assert gov("vote", str(proposal), "--key", str(tmp_path / f"{voter}.key"), "--voter", voter, "--choice", "yes",
                   "--out", str(tmp_path / f"{voter}-vote.json")).returncode == 0

    def submit(path: Path, round_: int) -> subprocess.CompletedProcess[str]:
        return gov("submit", str(path), "--ledger", str(ledger), "--round", str(round_))

    # A vote for a proposal not in the ledger yet is refused, and the file is untouched.
    before = ledger.read_bytes()
    early = submit(tmp_path / "bob-vote.json", 1)
    assert early.returncode == 2 and "not in the ledger" in early.stderr and ledger.read_bytes() == before
    assert submit(proposal, 1).returncode == 0
    assert submit(tmp_path / "bob-vote.json", 1).returncode == 0
    outsider = submit(tmp_path / "eve-vote.json", 2)
    assert outsider.returncode == 2 and "'eve', who is not a maintainer" in outsider.stderr
    (tmp_path / "broken.json").write_text('{"kind": "vote", "run": ')
    assert "not a readable JSON document" in submit(tmp_path / "broken.json", 2).stderr
    late = submit(tmp_path / "carol-vote.json", 5)
    assert late.returncode == 2 and "voting period closed" in late.stderr
    assert submit(tmp_path / "carol-vote.json", 2).returncode == 0

    tallied = gov("tally", "--ledger", str(ledger), "--round", "2")
    assert "accepted, in force from round 4" in tallied.stdout
    log = gov("log", "--ledger", str(ledger)).stdout
    assert "alice proposes" in log and "'inner_lr': 0.001" in log
    assert gov("verify", "--ledger", str(ledger)).returncode == 0

    document = json.loads(ledger.read_text())
    document["entries"][0]["item"]["reason"] = "no reason"  # tampered after signing
    ledger.write_text(json.dumps(document))
    tampered = gov("verify", "--ledger", str(ledger))
    assert tampered.returncode == 1 and "ledger entry 0" in tampered.stdout and "signature does not verify" in tampered.stdout
