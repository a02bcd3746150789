"""The signed documents of governance: genesis, proposals and votes, in canonical JSON.

Every hash and signature is over canonical bytes (sorted keys, no spaces,
UTF-8), so a document means the same bytes on every machine. A proposal and a
vote name the run (the genesis hash), so neither can be replayed in another run;
a vote signs the proposal's id, so it cannot be moved to another proposal. Both
sign the run round they were made at: when a change comes into force follows
from those signed rounds alone (governance.state), never from what whoever
keeps the ledger says.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


class GovernanceError(ValueError):
    """A document or ledger entry that breaks a rule; the message names the rule."""


def canonical(document: dict) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def digest(document: dict) -> str:
    return hashlib.sha256(canonical(document)).hexdigest()


def unsigned(document: dict) -> dict:
    return {key: value for key, value in document.items() if key != "signature"}


# --- keys -------------------------------------------------------------------------------------


def generate_key(path: Path) -> str:
    """Write a new Ed25519 private key (PEM, owner-only) and return its public key in hex."""
    key = Ed25519PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return public_hex(key)


def load_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError) as error:
        raise GovernanceError(f"{path}: not a readable PEM private key ({error})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise GovernanceError(f"{path}: a {type(key).__name__}, not an Ed25519 key (make one with `essaim gov keygen`)")
    return key


def public_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def sign(document: dict, key: Ed25519PrivateKey) -> dict:
    body = unsigned(document)
    return {**body, "signature": key.sign(canonical(body)).hex()}


def signature_valid(document: dict, public_key_hex: str) -> bool:
    try:
        public_key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex))
        public_key.verify(bytes.fromhex(str(document.get("signature", ""))), canonical(unsigned(document)))
        return True
    except (InvalidSignature, ValueError):
        return False


# --- documents --------------------------------------------------------------------------------


def make_genesis(run: str, maintainers: dict[str, str], policy: dict, config: dict, institutions: dict[str, str]) -> dict:
    """A run's first document: who governs it, under which policy, starting from which config.

    ``institutions`` maps each admitted institution's name to its Ed25519 public key (hex):
    a worker is credited to an institution only with a certificate that key signed.
    Its rules are checked where every ledger starts from it (governance.state.RunState).
    """
    return {"kind": "genesis", "run": run, "maintainers": maintainers, "policy": policy, "config": config,
            "institutions": institutions}


def make_proposal(genesis_hash: str, author: str, change: dict, reason: str, key: Ed25519PrivateKey, *,
                  round_: int) -> dict:
    """A proposal signed at run round ``round_``; its voting period counts from that round.

    Its id is the hash of everything but the signature, a fresh nonce included.
    """
    body = {"kind": "proposal", "run": genesis_hash, "author": author, "change": change, "reason": reason,
            "round": _round(round_), "nonce": os.urandom(8).hex()}
    return sign(body, key)


def proposal_id(proposal: dict) -> str:
    return digest(unsigned(proposal))


def make_vote(genesis_hash: str, proposal: dict, voter: str, choice: str, key: Ed25519PrivateKey, *,
              round_: int) -> dict:
    """A vote signed at run round ``round_``: the vote that passes a proposal dates its activation."""
    if choice not in ("yes", "no"):
        raise GovernanceError(f"vote {choice!r}: a vote is yes or no")
    return sign({"kind": "vote", "run": genesis_hash, "proposal": proposal_id(proposal), "voter": voter,
                 "choice": choice, "round": _round(round_)}, key)


def _round(round_: int) -> int:
    if not isinstance(round_, int) or isinstance(round_, bool) or round_ < 0:
        raise GovernanceError(f"round {round_!r}: the run's current round, an integer >= 0 (essaim status shows it)")
    return round_


def read_document(path: Path) -> dict:
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise GovernanceError(f"{path}: not a readable JSON document ({error})") from None
    if not isinstance(document, dict) or "kind" not in document:
        raise GovernanceError(f"{path}: not a governance document (no 'kind')")
    return document


def write_document(path: Path, document: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
