"""Ed25519 identities: a worker (or coordinator) is its key pair."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PUBLIC_KEY_BYTES = 32


def worker_id_for(public_key: bytes) -> str:
    """A short, stable name derived from the key, so ids cannot be chosen or spoofed."""
    return hashlib.sha256(public_key).hexdigest()[:32]


class Identity:
    """A private key plus what is derived from it."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self.public_key: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.worker_id: str = worker_id_for(self.public_key)

    @classmethod
    def generate(cls) -> "Identity":
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path) -> "Identity":
        """Load a PEM key, or create one readable only by its owner."""
        if path.exists():
            try:
                key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except ValueError as error:
                raise ValueError(
                    f"{path} is not a PEM Ed25519 private key ({error}); "
                    "move it away to create a new identity"
                ) from error
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
            return cls(key)
        identity = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = identity._private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        return identity

    def sign(self, message: bytes) -> bytes:
        return self._private_key.sign(message)


def verify_signature(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """True when `signature` is a valid Ed25519 signature of `message` by `public_key`."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True
