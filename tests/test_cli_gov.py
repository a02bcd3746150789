"""`essaim gov` as maintainers use it: keys and signatures on their own machines, one ledger file."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from essaim.processes import essaim_command


def essaim(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(essaim_command(*args), capture_output=True, text=True, timeout=60)


def gov(*args: str) -> subprocess.CompletedProcess[str]:
    return essaim("gov", *args)


def test_maintainers_change_the_inner_lr_by_signed_vote_and_bad_input_leaves_the_ledger_unchanged(tmp_path: Path) -> None:
    keys = {name: gov("keygen", str(tmp_path / f"{name}.key")).stdout.strip() for name in ("alice", "bob", "carol", "eve")}
    inria = essaim("institution", "keygen", str(tmp_path / "inria.key")).stdout.strip()
    ledger = tmp_path / "ledger.json"
    made = gov("init", "--ledger", str(ledger), "--run", "lucie-mini", "--quorum", "2", "--threshold", "2",
               "--voting-period", "3", "--activation-delay", "2", "--config", "inner_lr=0.002",
               f"--institution=Inria={inria}", *(f"--maintainer={n}={keys[n]}" for n in ("alice", "bob", "carol")))
    assert made.returncode == 0, made.stderr
    genesis = json.loads(ledger.read_text())["genesis"]
    assert genesis["institutions"] == {"Inria": inria} and "--genesis " in made.stdout
    proposal = tmp_path / "lr.json"
    assert gov("propose", "--ledger", str(ledger), "--key", str(tmp_path / "alice.key"), "--author", "alice",
               "--change", '{"config": {"inner_lr": 0.001}}', "--reason", "loss spikes", "--round", "1",
               "--out", str(proposal)).returncode == 0

    def vote(voter: str, round_: int, name: str = "") -> Path:
        out = tmp_path / f"{name or voter}-vote.json"
        assert gov("vote", str(proposal), "--key", str(tmp_path / f"{voter}.key"), "--voter", voter, "--choice", "yes",
                   "--round", str(round_), "--out", str(out)).returncode == 0
        return out

    def submit(path: Path, round_: int) -> subprocess.CompletedProcess[str]:
        return gov("submit", str(path), "--ledger", str(ledger), "--round", str(round_))

    # A vote for a proposal not in the ledger yet is refused, and the file is untouched.
    before = ledger.read_bytes()
    early = submit(vote("bob", 1), 1)
    assert early.returncode == 2 and "not in the ledger" in early.stderr and ledger.read_bytes() == before
    assert submit(proposal, 1).returncode == 0
    assert submit(tmp_path / "bob-vote.json", 1).returncode == 0
    outsider = submit(vote("eve", 2), 2)
    assert outsider.returncode == 2 and "'eve', who is not a maintainer" in outsider.stderr
    (tmp_path / "broken.json").write_text('{"kind": "vote", "run": ')
    assert "not a readable JSON document" in submit(tmp_path / "broken.json", 2).stderr
    future = submit(vote("carol", 3, "carol-future"), 2)  # signed for a round the run has not reached
    assert future.returncode == 2 and "signed at round 3, after the run's current round 2" in future.stderr
    late = submit(vote("carol", 5, "carol-late"), 5)
    assert late.returncode == 2 and "outside its voting period, rounds 1 to 4" in late.stderr
    passed = submit(vote("carol", 2), 2)
    assert passed.returncode == 0 and "passed: in force from round 4" in passed.stdout, passed.stderr

    log = gov("log", "--ledger", str(ledger)).stdout
    assert "alice proposes" in log and "'inner_lr': 0.001" in log and "passed at round 2, in force from round 4" in log
    assert gov("verify", "--ledger", str(ledger)).returncode == 0

    document = json.loads(ledger.read_text())
    document["entries"][0]["item"]["reason"] = "no reason"  # tampered after signing
    ledger.write_text(json.dumps(document))
    tampered = gov("verify", "--ledger", str(ledger))
    assert tampered.returncode == 1 and "ledger entry 0" in tampered.stdout and "signature does not verify" in tampered.stdout


def test_an_operator_who_redates_a_vote_in_the_ledger_file_is_caught_at_that_entry(tmp_path: Path) -> None:
    keys = {name: gov("keygen", str(tmp_path / f"{name}.key")).stdout.strip() for name in ("alice", "bob")}
    ledger = tmp_path / "ledger.json"
    assert gov("init", "--ledger", str(ledger), "--run", "r", "--quorum", "2", "--threshold", "2",
               *(f"--maintainer={n}={keys[n]}" for n in keys)).returncode == 0
    proposal = tmp_path / "p.json"
    gov("propose", "--ledger", str(ledger), "--key", str(tmp_path / "alice.key"), "--author", "alice", "--change",
        '{"config": {"inner_steps": 5}}', "--reason", "r", "--round", "3", "--out", str(proposal))
    for voter, round_ in (("alice", 3), ("bob", 6)):
        gov("vote", str(proposal), "--key", str(tmp_path / f"{voter}.key"), "--voter", voter, "--choice", "yes",
            "--round", str(round_), "--out", str(tmp_path / f"{voter}.json"))
    for document, round_ in ((proposal, 3), (tmp_path / "alice.json", 3), (tmp_path / "bob.json", 6)):
        assert gov("submit", str(document), "--ledger", str(ledger), "--round", str(round_)).returncode == 0
    document = json.loads(ledger.read_text())
    document["entries"][2]["round"] = 3  # as if bob had voted at round 3: the change would come in force sooner
    ledger.write_text(json.dumps(document))
    redated = gov("verify", "--ledger", str(ledger))
    assert redated.returncode == 1
    assert "ledger entry 2: the entry says round 3, but its vote was signed at round 6" in redated.stdout
