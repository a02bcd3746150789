"""Round credentials and member statements: the exact bytes that are signed, and their checks.

A round credential is the coordinator's word that a hivemind peer is a registered
worker of this run for one round, with how many tokens it leased there (the most
weight it may average with) and its trust class. Peers check it before they match,
reduce or share state with anyone (worker/peer_admission.py), and DHT records that
steer matchmaking carry it (protocol/swarm.py).

A member statement is a worker's own word, signed with its key, of what it trained in
a round (its leases' usage). It travels in the averaging group with the credential,
so every member's report can vouch for every other member's tokens.

Both are a serialized protobuf message inside `Signed`: the signature covers a domain
tag and those exact bytes, never a re-serialization.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from google.protobuf.message import DecodeError

from protocol import essaim_pb2 as pb
from protocol.identity import Identity, verify_signature, worker_id_for

CREDENTIAL_TAG = b"essaim/round-credential/v1\n"
STATEMENT_TAG = b"essaim/member-statement/v1\n"
MAX_SIGNED_BYTES = 4096  # a credential or a statement is a few hundred bytes; refuse anything bigger unparsed


class CredentialError(ValueError):
    """A credential or statement that must not be trusted; the message says which check failed."""


def _sign(tag: bytes, body: bytes, identity: Identity) -> bytes:
    return pb.Signed(body=body, signature=identity.sign(tag + body)).SerializeToString()


def _open(tag: bytes, blob: bytes, what: str) -> pb.Signed:
    if len(blob) > MAX_SIGNED_BYTES:
        raise CredentialError(f"{what}: {len(blob)} bytes, more than the {MAX_SIGNED_BYTES} a {what} may take")
    try:
        signed = pb.Signed.FromString(blob)
    except DecodeError as error:
        raise CredentialError(f"{what}: not a signed message ({error})") from None
    if not signed.body or not signed.signature:
        raise CredentialError(f"{what}: no body or no signature")
    return signed


def _parse(message_type: type, body: bytes, what: str):  # type: ignore[no-untyped-def]
    try:
        return message_type.FromString(body)
    except DecodeError as error:
        raise CredentialError(f"{what}: malformed body ({error})") from None


def claimed_round(blob: bytes) -> int:
    """The round a round credential names, unchecked (where it only sorts credentials; peers check them)."""
    return _parse(pb.RoundCredential, _open(CREDENTIAL_TAG, blob, "round credential").body, "round credential").round


def issue_credential(coordinator: Identity, credential: pb.RoundCredential) -> bytes:
    return _sign(CREDENTIAL_TAG, credential.SerializeToString(deterministic=True), coordinator)


@dataclass(frozen=True)
class CredentialCheck:
    """What a credential must say to admit a peer: this run, signed by its coordinator, not expired."""

    coordinator_key: bytes
    run_id: str

    def read(self, blob: bytes, now: float | None = None) -> pb.RoundCredential:
        signed = _open(CREDENTIAL_TAG, blob, "round credential")
        if not verify_signature(self.coordinator_key, signed.signature, CREDENTIAL_TAG + signed.body):
            raise CredentialError("round credential: not signed by this run's coordinator")
        credential = _parse(pb.RoundCredential, signed.body, "round credential")
        if credential.run_id != self.run_id:
            raise CredentialError(f"round credential: issued for run {credential.run_id!r}, not {self.run_id!r}")
        if credential.expires_at < (time.time() if now is None else now):
            raise CredentialError(f"round credential of worker {credential.worker_id[:8]} for round "
                                  f"{credential.round} expired")
        if worker_id_for(credential.worker_key) != credential.worker_id:
            raise CredentialError("round credential: its worker key does not match its worker id")
        return credential


def sign_statement(identity: Identity, statement: pb.MemberStatement) -> bytes:
    return _sign(STATEMENT_TAG, statement.SerializeToString(deterministic=True), identity)


def read_statement(blob: bytes, public_key_of: Callable[[str], bytes | None] = lambda _id: None,
                   key: bytes | None = None) -> pb.MemberStatement:
    """The statement, checked against its worker's key: `key`, or looked up by the id it names."""
    signed = _open(STATEMENT_TAG, blob, "member statement")
    statement = _parse(pb.MemberStatement, signed.body, "member statement")
    if key is None:
        key = public_key_of(statement.worker_id)
        if key is None:
            raise CredentialError(f"member statement of unknown worker {statement.worker_id!r}")
    if worker_id_for(key) != statement.worker_id or not verify_signature(key, signed.signature,
                                                                         STATEMENT_TAG + signed.body):
        raise CredentialError(f"member statement of worker {statement.worker_id[:8]}: bad signature")
    return statement
