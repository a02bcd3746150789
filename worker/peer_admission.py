"""Who may average with this worker: peers holding this run's round credential, and what each may do.

Every peer enters a round's matchmaking with a `GroupEntry`: its round credential (the
coordinator's word: this peer, this round, at most these tokens, this trust class) and its
member statement (its own signed usage of its leases, protocol/credentials.py). A leader
refuses a follower whose entry does not check out; every member checks every other
member's entry before the all-reduce starts, and a group with one bad entry does not
average. Once admitted, a peer's weight is capped at its credential's tokens, and when the
group holds any `hpc` or `institution` worker, volunteers reduce no slice.

`OpenAdmission` admits anyone: for averaging tests that run without a coordinator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from protocol import essaim_pb2 as pb
from protocol.credentials import CredentialCheck, CredentialError, read_statement, sign_statement
from protocol.identity import Identity

TRUSTED_REDUCERS = ("hpc", "institution")


@dataclass(frozen=True)
class GroupEntry:
    """What a peer gathers into its averaging group (hivemind's `gather`), as msgpack-able bytes."""

    round: int
    credential: bytes = b""
    statement: bytes = b""

    @classmethod
    def signed(cls, identity: Identity, run_id: str, round_number: int, credential: bytes,
               consumed: dict[int, int], loss: float) -> "GroupEntry":
        """A worker's entry: its newest credential and its statement of the tokens it trained, signed."""
        statement = pb.MemberStatement(
            run_id=run_id, worker_id=identity.worker_id, round=round_number, loss=loss,
            leases=[pb.LeaseUsage(lease_id=i, tokens_consumed=n) for i, n in consumed.items()],
        )
        return cls(round_number, credential, sign_statement(identity, statement))

    def gathered(self) -> dict:
        return {"round": self.round, "credential": self.credential, "statement": self.statement}

    @classmethod
    def from_gathered(cls, data: object) -> "GroupEntry":
        if not isinstance(data, dict) or not isinstance(data.get("round"), int):
            raise CredentialError(f"not a group entry: {type(data).__name__}")
        credential, statement = data.get("credential", b""), data.get("statement", b"")
        if not isinstance(credential, bytes) or not isinstance(statement, bytes):
            raise CredentialError("a group entry's credential and statement must be bytes")
        return cls(data["round"], credential, statement)


@dataclass(frozen=True)
class Admitted:
    max_weight: float     # the most tokens this peer's pseudo-gradient may weigh
    may_reduce: bool      # False: it gets no slice of the all-reduce


class OpenAdmission:
    """Admits every peer with its declared weight (tests of the averaging itself)."""

    def check(self, peer_id: str, entry: GroupEntry, round_number: int) -> pb.RoundCredential | None:
        if entry.round != round_number:
            raise CredentialError(f"peer {peer_id[:12]} is at round {entry.round}, not {round_number}")
        return None

    def group(self, peer_ids: Sequence[str], entries: Sequence[GroupEntry], round_number: int) -> list[Admitted]:
        for peer_id, entry in zip(peer_ids, entries):
            self.check(peer_id, entry, round_number)
        return [Admitted(float("inf"), True) for _ in peer_ids]


class CredentialAdmission(OpenAdmission):
    """Admits the peers whose entries check out against the run's coordinator key."""

    def __init__(self, credentials: CredentialCheck) -> None:
        self._credentials = credentials

    def check(self, peer_id: str, entry: GroupEntry, round_number: int) -> pb.RoundCredential:
        """The peer's credential, or CredentialError saying why it may not average in this round."""
        super().check(peer_id, entry, round_number)
        credential = self._credentials.read(entry.credential)
        if credential.peer_id != peer_id:
            raise CredentialError(f"peer {peer_id[:12]} presents the credential of peer {credential.peer_id[:12]}")
        if credential.round != round_number:
            raise CredentialError(f"peer {peer_id[:12]} holds a credential for round {credential.round}, "
                                  f"not {round_number}")
        statement = read_statement(entry.statement, key=credential.worker_key)
        if statement.round != round_number or statement.worker_id != credential.worker_id:
            raise CredentialError(f"peer {peer_id[:12]}'s member statement is not its own for round {round_number}")
        trained = sum(usage.tokens_consumed for usage in statement.leases)
        if trained > credential.tokens:
            raise CredentialError(f"peer {peer_id[:12]} states {trained} tokens trained; its credential allows "
                                  f"{credential.tokens}")
        return credential

    def group(self, peer_ids: Sequence[str], entries: Sequence[GroupEntry], round_number: int) -> list[Admitted]:
        credentials = [self.check(peer_id, entry, round_number) for peer_id, entry in zip(peer_ids, entries)]
        trusted = any(credential.trust_class in TRUSTED_REDUCERS for credential in credentials)
        return [Admitted(float(credential.tokens), not trusted or credential.trust_class in TRUSTED_REDUCERS)
                for credential in credentials]
