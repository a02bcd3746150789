"""The hash-chained ledger: genesis, then entries that each commit to the one before.

An entry is {seq, prev, round, item}: its position, the hash of the previous
entry (the genesis hash for the first), the run round it was appended at
(never going back), and a signed proposal, a signed vote, or a decision that
follows from the votes. Verification replays every entry from genesis through
governance.state's rules; a reordered, dropped, duplicated, forged or edited
entry breaks the chain or a rule, and is named. A ledger cut short is a valid
prefix: compare its head with a head you trust (`verify(..., head=)`).
"""

from __future__ import annotations

import json
from pathlib import Path

from governance.documents import GovernanceError, digest
from governance.state import RunState

ITEM_KINDS = ("proposal", "vote", "decision")


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
    round_ = entry["round"]
    if not isinstance(round_, int) or isinstance(round_, bool) or round_ < last_round:
        raise GovernanceError(f"round {round_!r} goes back before round {last_round}")
    item = entry["item"]
    kind = item.get("kind") if isinstance(item, dict) else None
    if kind == "proposal":
        state.add_proposal(item, round_, index)
    elif kind == "vote":
        state.add_vote(item, round_)
    elif kind == "decision":
        state.add_decision(item, round_)
    else:
        raise GovernanceError(f"item kind {kind!r}: a ledger holds {', '.join(ITEM_KINDS)}")
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

    def append(self, item: dict, round_: int) -> dict:
        entry = {"seq": len(self.entries), "prev": self.head, "round": round_, "item": item}
        replay = verify(self.genesis, self.entries + [entry])  # all or nothing: self is untouched on refusal
        self.entries.append(entry)
        self.state = replay
        return entry

    def tally(self, round_: int) -> list[dict]:
        """Append the decision due on every open proposal at this round; the entries appended."""
        appended = []
        for proposal in list(self.state.proposals.values()):
            decision = self.state.decide(proposal, round_)
            if decision is not None:
                appended.append(self.append(decision, round_))
        return appended

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


def follow(current: Ledger | None, document: bytes) -> Ledger:
    """The ledger in `document` if it verifies and only extends `current` (same genesis, same earlier entries).

    Coordinator and workers call this on every new ledger they receive: a history
    that changes what they already accepted is refused, whoever signed it.
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
    return newer
