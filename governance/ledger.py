"""The hash-chained ledger: genesis, then entries that each commit to the one before.

An entry is {seq, prev, round, item}: its position, the hash of the previous
entry (the genesis hash for the first), the round its item was signed at
(never going back), and a signed proposal or vote. The entry's round is a copy
of the item's signed one, kept so the chain reads without opening items; an
entry whose round says otherwise is refused. Verification replays every entry
from genesis through governance.state's rules; a reordered, dropped,
duplicated, forged or edited entry breaks the chain or a rule, and is named. A
ledger cut short is a valid prefix: compare its head with a head you trust
(`verify(..., head=)`).
"""

from __future__ import annotations

import json
from pathlib import Path

from governance.documents import GovernanceError, digest
from governance.state import Accepted, RunState, signed_round

ITEM_KINDS = ("proposal", "vote")


def entry_hash(entry: dict) -> str:
    return digest(entry)


def verify(genesis: dict, entries: list[dict], head: str | None = None) -> RunState:
    """The run state after replaying every entry; GovernanceError naming the first entry that breaks a rule."""
    state = RunState(genesis)
    previous, last_round = state.genesis_hash, 0
    for index, entry in enumerate(entries):
        try:
            last_round = _apply(state, entry, index, previous, last_round)
        except GovernanceError as error:
            raise GovernanceError(f"ledger entry {index}: {error}") from None
        previous = entry_hash(entry)
    if head is not None and head != previous:
        raise GovernanceError(f"the ledger's head is {previous[:16]}…, not the trusted head {head[:16]}… "
                              "(cut short, or another history)")
    return state


def _apply(state: RunState, entry: object, index: int, previous: str, last_round: int) -> int:
    if not isinstance(entry, dict) or sorted(entry) != ["item", "prev", "round", "seq"]:
        raise GovernanceError("malformed: an entry is {seq, prev, round, item}")
    if entry["seq"] != index:
        raise GovernanceError(f"seq {entry['seq']!r} where {index} belongs (reordered, dropped or duplicated)")
    if entry["prev"] != previous:
        raise GovernanceError("does not commit to the entry before it (reordered, dropped, duplicated or edited)")
    item = entry["item"]
    kind = item.get("kind") if isinstance(item, dict) else None
    if kind not in ITEM_KINDS:
        raise GovernanceError(f"item kind {kind!r}: a ledger holds signed {' and '.join(ITEM_KINDS)}s (what passes "
                              "follows from the votes)")
    round_ = signed_round(item)
    if entry["round"] != round_:
        raise GovernanceError(f"the entry says round {entry['round']!r}, but its {kind} was signed at round {round_}")
    if round_ < last_round:
        raise GovernanceError(f"{kind} signed at round {round_} goes back before round {last_round}, the round "
                              "of the entry before it (its signer makes it again at the current round)")
    if kind == "proposal":
        state.add_proposal(item, index)
    else:
        state.add_vote(item)
    return round_


class Ledger:
    """A verified ledger in memory. Appending checks the new item under the rules; a refused item changes nothing."""

    def __init__(self, genesis: dict, entries: list[dict] | None = None) -> None:
        self.genesis = genesis
        self.entries: list[dict] = list(entries or [])
        self.state = verify(genesis, self.entries)

    @property
    def head(self) -> str:
        return entry_hash(self.entries[-1]) if self.entries else self.state.genesis_hash

    @property
    def last_round(self) -> int:
        return self.entries[-1]["round"] if self.entries else 0

    def append(self, item: dict, current_round: int) -> dict:
        """Append a signed item while the run is at ``current_round``; the entry appended.

        Beyond the replayed rules, what only the run's clock can tell: an item signed
        for a later round, or a vote passing a change into force at a round the run has
        already begun (a change must never rewrite rounds already trained), is refused.
        """
        entry = {"seq": len(self.entries), "prev": self.head, "round": item.get("round") if isinstance(item, dict)
                 else None, "item": item}
        replay = verify(self.genesis, self.entries + [entry])  # all or nothing: self is untouched on refusal
        if entry["round"] > current_round:  # verified: the item's signed round
            raise GovernanceError(f"{item['kind']} signed at round {entry['round']}, after the run's current round "
                                  f"{current_round}: its signer makes it again at the current round")
        passed = _newly_accepted(self.state, replay)
        if passed and passed[0].activation_round <= current_round:
            raise GovernanceError(
                f"this vote passes proposal {passed[0].proposal[:16]}…, in force from round "
                f"{passed[0].activation_round} (its signed round + the activation delay), but the run is already at "
                f"round {current_round}: the voter signs again at the current round")
        self.entries.append(entry)
        self.state = replay
        return entry

    def to_json(self) -> dict:
        return {"genesis": self.genesis, "entries": self.entries}

    @classmethod
    def from_json(cls, document: object) -> "Ledger":
        if not isinstance(document, dict) or not isinstance(document.get("genesis"), dict) or not isinstance(
                document.get("entries"), list):
            raise GovernanceError("not a ledger: expected {genesis: {...}, entries: [...]}")
        return cls(document["genesis"], document["entries"])

    @classmethod
    def load(cls, path: Path) -> "Ledger":
        try:
            document = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise GovernanceError(f"{path}: not a readable ledger ({error})") from None
        return cls.from_json(document)

    def save(self, path: Path) -> None:
        temporary = Path(path).with_name(f".{Path(path).name}.tmp")
        temporary.write_text(json.dumps(self.to_json(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        temporary.replace(path)


def _newly_accepted(before: RunState, after: RunState) -> list[Accepted]:
    known = {accepted.proposal for accepted in before.accepted}
    return [accepted for accepted in after.accepted if accepted.proposal not in known]


def follow(current: Ledger | None, document: bytes, begun_round: int = -1) -> Ledger:
    """The ledger in `document` if it verifies and only extends `current` (same genesis, same earlier entries).

    Coordinator and workers call this on every new ledger they receive: a history
    that changes what they already accepted is refused, whoever signed it, and so is
    one that puts a change in force at a round they have already begun (up to
    ``begun_round``), which would change what they trained after the fact.
    """
    try:
        newer = Ledger.from_json(json.loads(document))
    except ValueError as error:
        raise GovernanceError(f"not a readable ledger ({error})") from None
    if current is not None:
        if newer.state.genesis_hash != current.state.genesis_hash:
            raise GovernanceError(f"the ledger's genesis is {newer.state.genesis_hash[:16]}…, not this run's "
                                  f"{current.state.genesis_hash[:16]}…")
        if newer.entries[: len(current.entries)] != current.entries:
            raise GovernanceError(f"the ledger rewrites history: its first {len(current.entries)} entries differ "
                                  "from the ones already accepted")
        late = [a for a in _newly_accepted(current.state, newer.state) if a.activation_round <= begun_round]
        if late:
            raise GovernanceError(f"the ledger puts proposal {late[0].proposal[:16]}… in force from round "
                                  f"{late[0].activation_round}, but round {begun_round} has already begun here")
    return newer
