"""Governance: the ledger verifies only as the maintainers signed it, and votes change the run as the policy says."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from governance.documents import (
    GovernanceError, digest, generate_key, load_key, make_genesis, make_proposal, make_vote, sign,
)
from governance.ledger import Ledger, verify

POLICY = {"quorum": 2, "threshold": 2, "voting_period_rounds": 3, "activation_delay_rounds": 2}
NAMES = ("alice", "bob", "carol")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict:
    directory = tmp_path_factory.mktemp("keys")
    public = {name: generate_key(directory / f"{name}.key") for name in (*NAMES, "mallory", "dave")}
    return {name: (public[name], load_key(directory / f"{name}.key")) for name in public}


def genesis_of(keys: dict) -> dict:
    return make_genesis("run", {n: keys[n][0] for n in NAMES}, POLICY, {"inner_lr": 0.002, "inner_steps": 20},
                        ["Inria", "GENCI"])


def vote(keys: dict, genesis: dict, proposal: dict, voter: str, choice: str = "yes") -> dict:
    return make_vote(digest(genesis), proposal, voter, choice, keys[voter][1])


def propose(keys: dict, genesis: dict, change: dict, author: str = "alice") -> dict:
    return make_proposal(digest(genesis), author, change, "because", keys[author][1])


@pytest.fixture(scope="module")
def history(keys: dict) -> Ledger:
    """Three proposals: one passes, one is rejected by votes, one changes the maintainer set; plus decisions."""
    genesis = genesis_of(keys)
    ledger = Ledger(genesis)
    lr = propose(keys, genesis, {"config": {"inner_lr": 0.001}})
    ledger.append(lr, 1)
    ledger.append(vote(keys, genesis, lr, "bob"), 1)
    ledger.append(vote(keys, genesis, lr, "carol"), 2)
    ledger.tally(2)
    steps = propose(keys, genesis, {"config": {"inner_steps": 5}}, "bob")
    ledger.append(steps, 3)
    ledger.append(vote(keys, genesis, steps, "alice", "no"), 3)
    ledger.append(vote(keys, genesis, steps, "carol", "no"), 4)
    rotate = propose(keys, genesis, {"maintainers": {"add": {"dave": keys["dave"][0]}, "remove": ["carol"]}})
    ledger.append(rotate, 5)
    ledger.append(vote(keys, genesis, rotate, "alice"), 5)
    ledger.append(vote(keys, genesis, rotate, "bob"), 5)
    ledger.tally(8)  # the rotation passes; the inner_steps proposal's period has closed
    ledger.append(propose(keys, genesis, {"institutions": {"admit": ["CNRS"]}}, "dave"), 10)
    return ledger


def test_votes_change_the_run_from_their_activation_round(history: Ledger) -> None:
    state = verify(history.genesis, history.entries, head=history.head)
    assert state.config_at(3)["inner_lr"] == 0.002 and state.config_at(4)["inner_lr"] == 0.001  # decided at 2, +2
    assert state.config_at(100)["inner_steps"] == 20  # rejected: two no votes
    assert set(state.maintainers_at(9)) == set(NAMES)
    assert set(state.maintainers_at(10)) == {"alice", "bob", "dave"}  # a new maintainer signs from round 10
    assert state.institutions_at(10) == ["GENCI", "Inria"]


@pytest.mark.parametrize("make_item, rule", [
    (lambda k, g, p: vote(k, g, p, "mallory"), "not a maintainer"),
    (lambda k, g, p: {**vote(k, g, p, "carol"), "choice": "no"}, "signature does not verify"),
    (lambda k, g, p: {key: v for key, v in vote(k, g, p, "carol").items() if key != "signature"}, "unsigned"),
    (lambda k, g, p: vote(k, g, p, "bob"), "already voted"),
    (lambda k, g, p: sign({**vote(k, g, p, "carol"), "proposal": "0" * 64}, k["carol"][1]), "not in the ledger"),
    (lambda k, g, p: sign({**vote(k, g, p, "carol"), "run": "f" * 64}, k["carol"][1]), "not this run"),
    (lambda k, g, p: p, "already in the ledger"),
    (lambda k, g, p: propose(k, g, {"config": {"inner_lr": 5}}), "out of range"),
    (lambda k, g, p: propose(k, g, {"config": {"seed": 1}}), "not a setting votes govern"),
    (lambda k, g, p: propose(k, g, {"maintainers": {"remove": ["bob", "carol"]}}), "must not exceed"),
    (lambda k, g, p: propose(k, g, {"maintainers": {"add": ["dave"]}}), "proposal change 'maintainers'"),
    (lambda k, g, p: propose(k, g, {"budget": 1}), "a map with one or more of"),
    (lambda k, g, p: {"kind": "ballot"}, "item kind 'ballot'"),
])
def test_a_bad_item_is_refused_with_its_rule_and_the_ledger_is_unchanged(keys: dict, make_item, rule: str) -> None:
    genesis = genesis_of(keys)
    ledger = Ledger(genesis)
    proposal = propose(keys, genesis, {"config": {"inner_lr": 0.001}})
    ledger.append(proposal, 1)
    ledger.append(vote(keys, genesis, proposal, "bob"), 1)
    before = copy.deepcopy(ledger.entries)
    with pytest.raises(GovernanceError, match=rule):
        ledger.append(make_item(keys, genesis, proposal), 2)
    assert ledger.entries == before
    assert ledger.state.proposals[next(iter(ledger.state.proposals))].yes == {"bob"}


def test_a_genesis_that_could_never_pass_anything_is_refused(keys: dict) -> None:
    maintainers = {n: keys[n][0] for n in NAMES}
    with pytest.raises(GovernanceError, match="must not exceed"):
        Ledger(make_genesis("run", maintainers, {**POLICY, "threshold": 4}, {}, None))
    with pytest.raises(GovernanceError, match="out of range"):
        Ledger(make_genesis("run", maintainers, POLICY, {"inner_lr": -1}, None))
    with pytest.raises(GovernanceError, match="64 hex digits"):
        Ledger(make_genesis("run", {"alice": "not-a-key"}, POLICY, {}, None))


def test_a_vote_after_the_period_and_a_decision_that_does_not_follow_are_refused(keys: dict) -> None:
    genesis = genesis_of(keys)
    ledger = Ledger(genesis)
    proposal = propose(keys, genesis, {"config": {"inner_lr": 0.001}})
    ledger.append(proposal, 1)
    with pytest.raises(GovernanceError, match="voting period closed"):
        ledger.append(vote(keys, genesis, proposal, "bob"), 5)
    forged = {"kind": "decision", "proposal": next(iter(ledger.state.proposals)),
              "accepted": True, "yes": ["bob"], "no": [], "activation_round": 3}
    with pytest.raises(GovernanceError, match="does not follow from its votes"):
        ledger.append(forged, 1)
    with pytest.raises(GovernanceError, match="goes back"):
        ledger.append(vote(keys, genesis, proposal, "bob"), 0)
    assert len(ledger.entries) == 1


# --- no forged, reordered, duplicated, dropped, edited or cut ledger verifies ------------------------


def _edit(entries: list[dict], data: st.DataObject) -> list[dict]:
    """Change one scalar somewhere inside one entry (always to a different value)."""
    entries = copy.deepcopy(entries)
    target = entries[data.draw(st.integers(0, len(entries) - 1), label="entry")]
    path, node = [], target
    while True:
        keys = sorted(node) if isinstance(node, dict) else list(range(len(node)))
        containers = [k for k in keys if isinstance(node[k], (dict, list)) and node[k]]
        leaves = [k for k in keys if not isinstance(node[k], (dict, list))]
        choices = containers + leaves
        key = data.draw(st.sampled_from(choices), label="key")
        path.append(key)
        if key in leaves:
            value = node[key]
            node[key] = (not value if isinstance(value, bool) else value + 1 if isinstance(value, (int, float))
                         else 0 if value is None else str(value)[:-1] + ("0" if str(value)[-1:] != "0" else "1"))
            return entries
        node = node[key]


MUTATIONS = ("drop", "swap", "duplicate", "edit", "forge", "cut")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), mutation=st.sampled_from(MUTATIONS))
def test_no_tampered_ledger_verifies(history: Ledger, keys: dict, data: st.DataObject, mutation: str) -> None:
    entries = history.entries
    n = len(entries)
    if mutation == "drop":
        index = data.draw(st.integers(0, n - 2))
        tampered = entries[:index] + entries[index + 1:]
    elif mutation == "swap":
        i = data.draw(st.integers(0, n - 2))
        j = data.draw(st.integers(i + 1, n - 1))
        tampered = list(entries)
        tampered[i], tampered[j] = tampered[j], tampered[i]
    elif mutation == "duplicate":
        index = data.draw(st.integers(0, n - 1))
        at = data.draw(st.integers(0, n))
        tampered = entries[:at] + [entries[index]] + entries[at:]
    elif mutation == "edit":
        tampered = _edit(entries, data)
    elif mutation == "forge":  # a well-chained entry whose item someone outside the maintainers signed
        index = data.draw(st.integers(0, n - 1))
        item = sign({**entries[index]["item"], "voter": "mallory", "author": "mallory"}, keys["mallory"][1])
        tampered = [dict(e) for e in entries[:index]] + [{**entries[index], "item": item}] + entries[index + 1:]
    else:  # cut: a prefix, checked against the head the verifier trusts
        tampered = entries[: data.draw(st.integers(0, n - 1))]
    with pytest.raises(GovernanceError):
        verify(history.genesis, tampered, head=history.head)


def test_cut_bytes_of_a_saved_ledger_are_refused(history: Ledger, tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    history.save(path)
    Ledger.load(path)
    text = path.read_text()
    for cut in (len(text) // 3, len(text) // 2, len(text) - 10):
        path.write_text(text[:cut])
        with pytest.raises(GovernanceError, match="not a readable ledger"):
            Ledger.load(path)
    assert json.loads(text)["genesis"] == history.genesis


def test_a_rotated_key_signs_from_the_activation_round_and_the_old_one_no_longer_does(keys: dict, tmp_path: Path) -> None:
    genesis = genesis_of(keys)
    ledger = Ledger(genesis)
    new_public = generate_key(tmp_path / "bob-2026.key")
    rotate = propose(keys, genesis, {"maintainers": {"rotate": {"bob": new_public}}}, "bob")
    ledger.append(rotate, 1)
    ledger.append(vote(keys, genesis, rotate, "alice"), 1)
    ledger.append(vote(keys, genesis, rotate, "carol"), 1)
    ledger.tally(1)  # in force from round 3
    later = propose(keys, genesis, {"config": {"outer_lr": 0.5}})
    ledger.append(later, 3)
    with pytest.raises(GovernanceError, match="signature does not verify"):
        ledger.append(vote(keys, genesis, later, "bob"), 3)  # bob's old key
    ledger.append(make_vote(digest(genesis), later, "bob", "yes", load_key(tmp_path / "bob-2026.key")), 3)
    assert ledger.state.maintainers_at(3)["bob"] == new_public != ledger.state.maintainers_at(2)["bob"]
