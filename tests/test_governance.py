"""Governance: the ledger verifies only as the maintainers signed it, and votes change the run as the policy says."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from governance.documents import (
    GovernanceError, digest, generate_key, load_key, make_genesis, make_proposal, make_vote, sign,
)
from governance.ledger import Ledger, follow, verify

POLICY = {"quorum": 2, "threshold": 2, "voting_period_rounds": 3, "activation_delay_rounds": 2}
NAMES = ("alice", "bob", "carol")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict:
    directory = tmp_path_factory.mktemp("keys")
    public = {name: generate_key(directory / f"{name}.key") for name in (*NAMES, "mallory", "dave", "inria", "genci")}
    return {name: (public[name], load_key(directory / f"{name}.key")) for name in public}


def genesis_of(keys: dict) -> dict:
    return make_genesis("run", {n: keys[n][0] for n in NAMES}, POLICY, {"inner_lr": 0.002, "inner_steps": 20},
                        {"Inria": keys["inria"][0], "GENCI": keys["genci"][0]})


def vote(keys: dict, genesis: dict, proposal: dict, voter: str, round_: int, choice: str = "yes") -> dict:
    return make_vote(digest(genesis), proposal, voter, choice, keys[voter][1], round_=round_)


def propose(keys: dict, genesis: dict, change: dict, round_: int, author: str = "alice") -> dict:
    return make_proposal(digest(genesis), author, change, "because", keys[author][1], round_=round_)


def add(ledger: Ledger, item: dict) -> dict:
    """Append an item while the run is at the round it was signed at."""
    return ledger.append(item, item["round"])


@pytest.fixture(scope="module")
def history(keys: dict) -> Ledger:
    """Three proposals: one passes, one is voted down, one changes the maintainer set; then one by the new maintainer."""
    genesis = genesis_of(keys)
    ledger = Ledger(genesis)
    lr = propose(keys, genesis, {"config": {"inner_lr": 0.001}}, 1)
    add(ledger, lr)
    add(ledger, vote(keys, genesis, lr, "bob", 1))
    add(ledger, vote(keys, genesis, lr, "carol", 2))  # passes it at round 2: in force from round 4
    steps = propose(keys, genesis, {"config": {"inner_steps": 5}}, 3, "bob")
    add(ledger, steps)
    add(ledger, vote(keys, genesis, steps, "alice", 3, "no"))
    add(ledger, vote(keys, genesis, steps, "carol", 4, "no"))
    rotate = propose(keys, genesis, {"maintainers": {"add": {"dave": keys["dave"][0]}, "remove": ["carol"]}}, 5)
    add(ledger, rotate)
    add(ledger, vote(keys, genesis, rotate, "alice", 5))
    add(ledger, vote(keys, genesis, rotate, "bob", 6))  # passes it at round 6: in force from round 8
    add(ledger, propose(keys, genesis, {"institutions": {"admit": {"CNRS": keys["mallory"][0]}}}, 10, "dave"))
    return ledger


def test_votes_change_the_run_from_their_activation_round(history: Ledger, keys: dict) -> None:
    state = verify(history.genesis, history.entries, head=history.head)
    assert state.config_at(3)["inner_lr"] == 0.002 and state.config_at(4)["inner_lr"] == 0.001  # passed at 2, +2
    assert state.config_at(100)["inner_steps"] == 20  # two no votes: never passed
    assert set(state.maintainers_at(7)) == set(NAMES)
    assert set(state.maintainers_at(8)) == {"alice", "bob", "dave"}  # a new maintainer signs from round 8
    assert state.institutions_at(10) == {"GENCI": keys["genci"][0], "Inria": keys["inria"][0]}  # CNRS: not voted


def test_the_activation_round_follows_from_the_signed_round_of_the_vote_that_passes(keys: dict) -> None:
    genesis = genesis_of(keys)
    ledger = Ledger(genesis)
    proposal = propose(keys, genesis, {"config": {"inner_lr": 0.001}}, 3)
    ledger.append(proposal, 5)  # appended later than it was signed: it is dated by its signature
    ledger.append(vote(keys, genesis, proposal, "bob", 4), 5)
    ledger.append(vote(keys, genesis, proposal, "carol", 5), 5)
    [accepted] = ledger.state.accepted
    assert accepted.activation_round == 5 + POLICY["activation_delay_rounds"]
    assert [entry["round"] for entry in ledger.entries] == [3, 4, 5]
    with pytest.raises(GovernanceError, match="already passed at round 5"):
        ledger.append(vote(keys, genesis, proposal, "alice", 5), 5)


@pytest.mark.parametrize("make_item, rule", [
    (lambda k, g, p: vote(k, g, p, "mallory", 2), "not a maintainer"),
    (lambda k, g, p: {**vote(k, g, p, "carol", 2), "choice": "no"}, "signature does not verify"),
    (lambda k, g, p: {**vote(k, g, p, "carol", 2), "round": 3}, "signature does not verify"),
    (lambda k, g, p: {key: v for key, v in vote(k, g, p, "carol", 2).items() if key != "signature"}, "unsigned"),
    (lambda k, g, p: {key: v for key, v in vote(k, g, p, "carol", 2).items() if key != "round"},
     "without a signed round"),
    (lambda k, g, p: vote(k, g, p, "bob", 2), "already voted"),
    (lambda k, g, p: vote(k, g, p, "carol", 0), "goes back before round 1"),
    (lambda k, g, p: vote(k, g, p, "carol", 5), "outside its voting period, rounds 1 to 4"),
    (lambda k, g, p: sign({**vote(k, g, p, "carol", 2), "proposal": "0" * 64}, k["carol"][1]), "not in the ledger"),
    (lambda k, g, p: sign({**vote(k, g, p, "carol", 2), "run": "f" * 64}, k["carol"][1]), "not this run"),
    (lambda k, g, p: p, "already in the ledger"),
    (lambda k, g, p: propose(k, g, {"config": {"inner_lr": 5}}, 2), "out of range"),
    (lambda k, g, p: propose(k, g, {"config": {"aggregation": "median"}}, 2), "aggregation = 'median' is out of range"),
    (lambda k, g, p: propose(k, g, {"retrain": {"workers": ["mallory"]}}, 2), "{workers: [worker ids]}"),
    (lambda k, g, p: propose(k, g, {"config": {"seed": 1}}, 2), "not a setting votes govern"),
    (lambda k, g, p: propose(k, g, {"maintainers": {"remove": ["bob", "carol"]}}, 2), "must not exceed"),
    (lambda k, g, p: propose(k, g, {"maintainers": {"add": ["dave"]}}, 2), "proposal change 'maintainers'"),
    (lambda k, g, p: propose(k, g, {"institutions": {"admit": ["CNRS"]}}, 2), "{admit: {name: public key}"),
    (lambda k, g, p: propose(k, g, {"budget": 1}, 2), "a map with one or more of"),
    (lambda k, g, p: {"kind": "decision", "proposal": "0" * 64, "accepted": True, "activation_round": 2},
     "item kind 'decision'"),
    (lambda k, g, p: {"kind": "ballot"}, "item kind 'ballot'"),
])
def test_a_bad_item_is_refused_with_its_rule_and_the_ledger_is_unchanged(keys: dict, make_item, rule: str) -> None:
    genesis = genesis_of(keys)
    ledger = Ledger(genesis)
    proposal = propose(keys, genesis, {"config": {"inner_lr": 0.001}}, 1)
    add(ledger, proposal)
    add(ledger, vote(keys, genesis, proposal, "bob", 1))
    before = copy.deepcopy(ledger.entries)
    with pytest.raises(GovernanceError, match=re.escape(rule)):
        ledger.append(make_item(keys, genesis, proposal), 10)
    assert ledger.entries == before
    assert ledger.state.proposals[next(iter(ledger.state.proposals))].yes == {"bob"}


def test_an_entry_whose_round_contradicts_its_signed_round_is_refused_by_name(keys: dict) -> None:
    """Whoever keeps the ledger cannot redate a vote: its round is inside the signature."""
    genesis = genesis_of(keys)
    ledger = Ledger(genesis)
    proposal = propose(keys, genesis, {"config": {"inner_lr": 0.001}}, 1)
    add(ledger, proposal)
    add(ledger, vote(keys, genesis, proposal, "bob", 1))
    add(ledger, vote(keys, genesis, proposal, "carol", 4))
    entries = copy.deepcopy(ledger.entries)
    entries[2]["round"] = 1  # as if carol had voted at round 1, so that the change came in force at round 3
    with pytest.raises(GovernanceError, match=r"ledger entry 2: the entry says round 1, but its vote was signed at round 4"):
        verify(genesis, entries)
    proposal_entries = copy.deepcopy(ledger.entries[:1])
    proposal_entries[0]["round"] = 0
    with pytest.raises(GovernanceError, match=r"ledger entry 0: the entry says round 0, but its proposal was signed"):
        verify(genesis, proposal_entries)


def test_an_item_signed_for_a_later_round_or_passing_a_change_into_a_begun_round_is_not_appended(keys: dict) -> None:
    genesis = genesis_of(keys)
    ledger = Ledger(genesis)
    with pytest.raises(GovernanceError, match="signed at round 9, after the run's current round 4"):
        ledger.append(propose(keys, genesis, {"config": {"inner_lr": 0.001}}, 9), 4)
    proposal = propose(keys, genesis, {"config": {"inner_lr": 0.001}}, 1)
    ledger.append(proposal, 1)
    ledger.append(vote(keys, genesis, proposal, "bob", 1), 1)
    late = vote(keys, genesis, proposal, "carol", 2)  # signed at round 2, brought to the ledger at round 6
    with pytest.raises(GovernanceError, match="in force from round 4 .* but the run is already at round 6"):
        ledger.append(late, 6)
    assert len(ledger.entries) == 2 and ledger.state.accepted == []
    ledger.append(vote(keys, genesis, proposal, "carol", 3), 3)  # signed again, in time
    assert ledger.state.accepted[0].activation_round == 5


def test_a_follower_refuses_a_ledger_that_puts_a_change_in_force_at_a_round_it_has_begun(keys: dict) -> None:
    genesis = genesis_of(keys)
    ledger = Ledger(genesis)
    proposal = propose(keys, genesis, {"config": {"inner_lr": 0.001}}, 1)
    add(ledger, proposal)
    add(ledger, vote(keys, genesis, proposal, "bob", 1))
    known = follow(None, json.dumps(ledger.to_json()).encode())
    add(ledger, vote(keys, genesis, proposal, "carol", 2))  # in force from round 4
    document = json.dumps(ledger.to_json()).encode()
    with pytest.raises(GovernanceError, match="in force from round 4, but round 4 has already begun here"):
        follow(known, document, begun_round=4)
    assert follow(known, document, begun_round=3).state.config_at(4)["inner_lr"] == 0.001


def test_a_genesis_that_could_never_pass_anything_or_names_institutions_without_keys_is_refused(keys: dict) -> None:
    maintainers = {n: keys[n][0] for n in NAMES}
    with pytest.raises(GovernanceError, match="must not exceed"):
        Ledger(make_genesis("run", maintainers, {**POLICY, "threshold": 4}, {}, {}))
    with pytest.raises(GovernanceError, match="out of range"):
        Ledger(make_genesis("run", maintainers, POLICY, {"inner_lr": -1}, {}))
    with pytest.raises(GovernanceError, match="64 hex digits"):
        Ledger(make_genesis("run", {"alice": "not-a-key"}, POLICY, {}, {}))
    with pytest.raises(GovernanceError, match="64 hex digits"):
        Ledger(make_genesis("run", maintainers, POLICY, {}, {"Inria": "not-a-key"}))
    # A genesis from before institutions held keys: the names alone prove nothing, so it is refused with what to do.
    legacy = {**make_genesis("run", maintainers, POLICY, {}, {}), "institutions": ["Inria", "GENCI"]}
    with pytest.raises(GovernanceError, match=r"--institution NAME=PUBLIC_KEY"):
        Ledger(legacy)
    assert Ledger({**legacy, "institutions": None}).state.institutions_at(0) == {}  # null: none admitted


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
    rotate = propose(keys, genesis, {"maintainers": {"rotate": {"bob": new_public}}}, 1, "bob")
    add(ledger, rotate)
    add(ledger, vote(keys, genesis, rotate, "alice", 1))
    add(ledger, vote(keys, genesis, rotate, "carol", 1))  # in force from round 3
    later = propose(keys, genesis, {"config": {"outer_lr": 0.5}}, 3)
    add(ledger, later)
    with pytest.raises(GovernanceError, match="signature does not verify"):
        add(ledger, vote(keys, genesis, later, "bob", 3))  # bob's old key
    add(ledger, make_vote(digest(genesis), later, "bob", "yes", load_key(tmp_path / "bob-2026.key"), round_=3))
    assert ledger.state.maintainers_at(3)["bob"] == new_public != ledger.state.maintainers_at(2)["bob"]


def test_a_retrain_decision_names_its_workers_from_its_activation_round(keys: dict) -> None:
    genesis = genesis_of(keys)
    ledger = Ledger(genesis)
    offender = "ab" * 16  # a worker id, as `essaim audit verify` names a quarantined worker
    retrain = propose(keys, genesis, {"retrain": {"workers": [offender]}}, 1)
    add(ledger, retrain)
    add(ledger, vote(keys, genesis, retrain, "bob", 1))
    add(ledger, vote(keys, genesis, retrain, "carol", 2))  # passes at round 2: in force from round 4
    state = verify(ledger.genesis, ledger.entries, head=ledger.head)
    assert state.retrain_at(3) == set() and state.retrain_at(4) == {offender}
