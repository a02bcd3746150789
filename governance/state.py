"""What governance decides: the rules a ledger is replayed under, and the run's settings in force at each round.

`RunState` starts from a genesis and takes signed ledger items one by one
(proposals and votes), refusing any that breaks a rule with a GovernanceError
that names it. Every item signs the round it was made at, and the rules read
only that signed round: a vote counts if signed within its proposal's voting
period, and a proposal passes at the round of the vote that gives it its
threshold and quorum; it is in force from that round plus the policy's
activation delay. So every node that replays the same ledger agrees on the
config of every round, and nobody who merely keeps the ledger can move a change
to another round.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from governance.documents import GovernanceError, digest, proposal_id, signature_valid
from protocol.choices import AGGREGATIONS, COMPRESSIONS, UNCHECKABLE_COMPRESSIONS

POLICY_FIELDS = ("quorum", "threshold", "voting_period_rounds", "activation_delay_rounds")
CONFIG_RULES = {  # what a vote may set in the run config, and what a value must be
    "inner_lr": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1,
    "outer_lr": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 10,
    "inner_steps": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    "compression": lambda v: v in COMPRESSIONS and v not in UNCHECKABLE_COMPRESSIONS,  # a run's choice at its start
    "aggregation": lambda v: v in AGGREGATIONS,  # how reducers combine a slice (worker/aggregation.py)
}
# "retrain": {"workers": [worker ids]}: the tokens of those workers' rounds no validator verified go back to
# the pool, to be trained again by others (coordinator/verification.py, retrain_unverified).
CHANGE_KINDS = ("config", "mixture", "institutions", "maintainers", "retrain")
UNGOVERNED_CONFIG_VERSION = "genesis"  # what lineage records for a run without a ledger: its one config


def _is_key(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _is_worker_id(value: object) -> bool:
    return isinstance(value, str) and len(value) == 32 and all(c in "0123456789abcdef" for c in value)


def _named_keys(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(name, str) and name and _is_key(key) for name, key in value.items())


def signed_round(item: dict) -> int:
    """The round a proposal or vote was signed at: the only round the rules read."""
    round_ = item.get("round")
    if "round" not in item:
        raise GovernanceError(f"{item.get('kind')} without a signed round (made before Essaim signed ledger rounds): "
                              "its signer makes it again with --round, the run's current round")
    if not isinstance(round_, int) or isinstance(round_, bool) or round_ < 0:
        raise GovernanceError(f"{item.get('kind')}: signed round {round_!r} is not an integer >= 0")
    return round_


def check_genesis(genesis: dict) -> None:
    policy = genesis.get("policy")
    if not isinstance(policy, dict) or sorted(policy) != sorted(POLICY_FIELDS) or not all(
            isinstance(policy[f], int) and not isinstance(policy[f], bool) and policy[f] >= 1 for f in POLICY_FIELDS):
        raise GovernanceError(f"genesis policy: needs positive integers {', '.join(POLICY_FIELDS)} and nothing else")
    maintainers = genesis.get("maintainers")
    if not isinstance(maintainers, dict) or not maintainers or not all(_is_key(k) for k in maintainers.values()):
        raise GovernanceError("genesis maintainers: a non-empty map of name -> Ed25519 public key (64 hex digits)")
    _check_policy_fits(policy, len(maintainers))
    check_config(genesis.get("config"), "genesis config")
    institutions = genesis.get("institutions")
    if isinstance(institutions, list):
        # A genesis from before institutions held keys: a bare name is something anyone can type.
        raise GovernanceError(
            "genesis institutions: a list of names, from before institutions held keys; nobody could prove to be "
            "one. Write a new genesis naming each institution's key: essaim gov init --institution NAME=PUBLIC_KEY "
            "(the institution makes its key with `essaim institution keygen`)")
    if institutions is not None and not _named_keys(institutions):
        raise GovernanceError("genesis institutions: a map of name -> Ed25519 public key (64 hex digits)")


def _check_policy_fits(policy: dict, maintainers: int) -> None:
    if policy["threshold"] > maintainers or policy["quorum"] > maintainers:
        raise GovernanceError(
            f"policy: threshold {policy['threshold']} and quorum {policy['quorum']} must not exceed "
            f"the {maintainers} maintainer(s), or nothing could ever pass"
        )


def check_config(config: object, where: str) -> None:
    if not isinstance(config, dict):
        raise GovernanceError(f"{where}: a map of setting -> value")
    for key, value in config.items():
        if key not in CONFIG_RULES:
            raise GovernanceError(f"{where}: {key!r} is not a setting votes govern ({', '.join(CONFIG_RULES)})")
        if not CONFIG_RULES[key](value):
            raise GovernanceError(f"{where}: {key} = {value!r} is out of range")


def check_change(change: object) -> None:
    if not isinstance(change, dict) or not change or set(change) - set(CHANGE_KINDS):
        raise GovernanceError(f"proposal change: a map with one or more of {', '.join(CHANGE_KINDS)}")
    check_config(change.get("config", {}), "proposal change 'config'")
    mixture = change.get("mixture", {})
    if not isinstance(mixture, dict) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in mixture.values()):
        raise GovernanceError("proposal change 'mixture': a map of source -> weight >= 0")
    institutions = change.get("institutions", {})
    removed = institutions.get("remove", []) if isinstance(institutions, dict) else None
    if not isinstance(institutions, dict) or set(institutions) - {"admit", "remove"} or not _named_keys(
            institutions.get("admit", {})) or not isinstance(removed, list) or not all(isinstance(n, str) for n in removed):
        raise GovernanceError("proposal change 'institutions': {admit: {name: public key}, remove: [names]}, "
                              "keys of 64 hex digits (admitting a name again replaces its key)")
    retrain = change.get("retrain", {"workers": []})
    if not isinstance(retrain, dict) or set(retrain) != {"workers"} or not isinstance(retrain["workers"], list) \
            or not all(_is_worker_id(w) for w in retrain["workers"]):
        raise GovernanceError("proposal change 'retrain': {workers: [worker ids]}, ids of 32 hex digits "
                              "(`essaim audit verify` names quarantined workers with theirs)")
    maintainers = change.get("maintainers", {})
    shape = "proposal change 'maintainers': {add: {name: key}, remove: [names], rotate: {name: key}}, keys of 64 hex digits"
    if not isinstance(maintainers, dict) or set(maintainers) - {"add", "remove", "rotate"}:
        raise GovernanceError(shape)
    for part in ("add", "rotate"):
        named_keys = maintainers.get(part, {})
        if not isinstance(named_keys, dict) or not all(_is_key(k) for k in named_keys.values()):
            raise GovernanceError(shape)
    removed = maintainers.get("remove", [])
    if not isinstance(removed, list) or not all(isinstance(name, str) for name in removed):
        raise GovernanceError(shape)


@dataclass
class Proposal:
    id: str
    author: str
    change: dict
    opened_round: int  # signed by its author
    seq: int
    yes: set[str] = field(default_factory=set)
    no: set[str] = field(default_factory=set)
    passed_round: int | None = None  # signed by the voter whose vote passed it


@dataclass(frozen=True)
class Accepted:
    proposal: str
    activation_round: int
    change: dict


class RunState:
    def __init__(self, genesis: dict) -> None:
        check_genesis(genesis)
        self.genesis = genesis
        self.genesis_hash = digest(genesis)
        self.policy = dict(genesis["policy"])
        self.proposals: dict[str, Proposal] = {}
        self.accepted: list[Accepted] = []

    # --- what is in force -----------------------------------------------------------------------

    def in_force(self, round_: int) -> list[Accepted]:
        return [a for a in self.accepted if a.activation_round <= round_]

    def maintainers_at(self, round_: int) -> dict[str, str]:
        maintainers = dict(self.genesis["maintainers"])
        for accepted in self.in_force(round_):
            change = accepted.change.get("maintainers", {})
            maintainers.update(change.get("add", {}))
            for name in change.get("remove", []):
                maintainers.pop(name, None)
            maintainers.update({n: k for n, k in change.get("rotate", {}).items() if n in maintainers})
        return maintainers

    def config_at(self, round_: int) -> dict:
        config = dict(self.genesis["config"])
        for accepted in self.in_force(round_):
            config.update(accepted.change.get("config", {}))
        return config

    def version_at(self, round_: int) -> str:
        """The config version in force: the newest accepted proposal active at this round, else the genesis."""
        in_force = self.in_force(round_)
        return in_force[-1].proposal if in_force else self.genesis_hash

    def mixture_at(self, round_: int) -> dict[str, float]:
        mixture: dict[str, float] = {}
        for accepted in self.in_force(round_):
            mixture.update(accepted.change.get("mixture", {}))
        return mixture

    def retrain_at(self, round_: int) -> set[str]:
        """Workers whose unverified tokens the maintainers decided to have trained again, by this round."""
        return {worker for accepted in self.in_force(round_)
                for worker in accepted.change.get("retrain", {}).get("workers", [])}

    def institutions_at(self, round_: int) -> dict[str, str]:
        """The admitted institutions at this round: name -> Ed25519 public key (hex), the key their certificates verify with."""
        admitted = dict(self.genesis["institutions"] or {})  # null: a genesis that admitted none by key
        for accepted in self.in_force(round_):
            change = accepted.change.get("institutions", {})
            admitted.update(change.get("admit", {}))
            for name in change.get("remove", []):
                admitted.pop(name, None)
        return admitted

    def closes_at(self, proposal: Proposal) -> int:
        """The last round a vote for this proposal may be signed at."""
        return proposal.opened_round + self.policy["voting_period_rounds"]

    # --- the rules, item by item ----------------------------------------------------------------

    def _check_signed(self, item: dict, signer: str, round_: int) -> None:
        if item.get("run") != self.genesis_hash:
            raise GovernanceError(f"{item.get('kind')} for run {str(item.get('run'))[:16]}…, not this run "
                                  f"{self.genesis_hash[:16]}… (replayed from another run?)")
        maintainers = self.maintainers_at(round_)
        if signer not in maintainers:
            raise GovernanceError(f"{item['kind']} signed by {signer!r}, who is not a maintainer at round {round_}")
        if "signature" not in item:
            raise GovernanceError(f"{item['kind']} by {signer!r} is unsigned")
        if not signature_valid(item, maintainers[signer]):
            raise GovernanceError(f"{item['kind']} by {signer!r}: the signature does not verify with their key "
                                  f"at round {round_} (tampered, or signed with another key)")

    def add_proposal(self, item: dict, seq: int) -> Proposal:
        round_ = signed_round(item)
        self._check_signed(item, str(item.get("author")), round_)
        check_change(item.get("change"))
        pid = proposal_id(item)
        if pid in self.proposals:
            raise GovernanceError(f"proposal {pid[:16]}… is already in the ledger (entry {self.proposals[pid].seq}): replayed")
        change = item["change"]
        if "maintainers" in change:
            size = len(self.maintainers_at(round_)) + len(change["maintainers"].get("add", {})) - len(
                change["maintainers"].get("remove", []))
            _check_policy_fits(self.policy, size)
        proposal = Proposal(pid, item["author"], change, round_, seq)
        self.proposals[pid] = proposal
        return proposal

    def add_vote(self, item: dict) -> None:
        """Count a signed vote; the vote that gives its proposal threshold and quorum passes it, from its round."""
        round_ = signed_round(item)
        voter = str(item.get("voter"))
        self._check_signed(item, voter, round_)
        proposal = self.proposals.get(str(item.get("proposal")))
        if proposal is None:
            raise GovernanceError(f"vote by {voter!r} for proposal {str(item.get('proposal'))[:16]}…, "
                                  "which is not in the ledger")
        if item.get("choice") not in ("yes", "no"):
            raise GovernanceError(f"vote by {voter!r}: choice {item.get('choice')!r} is neither yes nor no")
        if proposal.passed_round is not None:
            raise GovernanceError(f"vote by {voter!r} for proposal {proposal.id[:16]}…: it already passed at round "
                                  f"{proposal.passed_round}")
        if not proposal.opened_round <= round_ <= self.closes_at(proposal):
            raise GovernanceError(f"vote by {voter!r} signed at round {round_} for proposal {proposal.id[:16]}…: "
                                  f"outside its voting period, rounds {proposal.opened_round} to "
                                  f"{self.closes_at(proposal)} (the voting period closed, or it was not open yet)")
        if voter in proposal.yes | proposal.no:
            raise GovernanceError(f"vote by {voter!r} for proposal {proposal.id[:16]}…: they already voted (replayed)")
        (proposal.yes if item["choice"] == "yes" else proposal.no).add(voter)
        votes = len(proposal.yes) + len(proposal.no)
        if len(proposal.yes) >= self.policy["threshold"] and votes >= self.policy["quorum"]:
            proposal.passed_round = round_
            self.accepted.append(Accepted(proposal.id, round_ + self.policy["activation_delay_rounds"], proposal.change))
