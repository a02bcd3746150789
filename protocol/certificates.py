"""Institution certificates: an institution's signed word that a worker's key trains on its behalf.

A certificate is a small JSON file its worker carries (`essaim institution certify`,
then `essaim worker join --certificate`) and presents at Register. It names the
institution, the institution's Ed25519 public key, the worker's public key, the
trust class it grants (``institution`` or ``hpc``) and when it expires. What is
signed is a domain tag followed by the canonical JSON (sorted keys, no spaces,
UTF-8) of every field but the signature, so the file may be re-indented but not
altered, and a signature made for anything else (a ledger entry, a request) can
never pass for a certificate.

Whether the institution counts is the run's to say: ``check`` takes the admitted
institutions (name -> public key) and credits the certificate only if its
institution is admitted with the very key that signed it.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.choices import CERTIFIED_CLASSES, INDEPENDENT
from protocol.identity import PUBLIC_KEY_BYTES, verify_signature

DOMAIN_TAG = b"essaim/institution-certificate/v1\n"
KIND = "essaim-institution-certificate"
MAX_CERTIFICATE_BYTES = 4096  # a certificate is a few hundred bytes; Register refuses anything larger unread
FIELDS = ("kind", "institution", "institution_key", "worker_key", "trust_class", "expires_at", "signature")
# Register's trailing metadata (binary, UTF-8 text): why the worker's claim or certificate was not credited.
ADMISSION_NOTE_METADATA = "essaim-admission-note-bin"


class CertificateError(ValueError):
    """A certificate that is unreadable or not to be credited; the message says which check failed."""


@dataclass(frozen=True)
class Certificate:
    institution: str
    institution_key: str  # hex, the key that signed it: credited only if the run admits the institution with it
    worker_key: str       # hex, the worker's Ed25519 public key (`essaim worker id` prints it)
    trust_class: str      # one of CERTIFIED_CLASSES
    expires_at: int       # unix seconds
    signature: str        # hex, Ed25519 over signed_bytes()

    def signed_bytes(self) -> bytes:
        body = {"kind": KIND, **asdict(self)}
        del body["signature"]
        return DOMAIN_TAG + json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    def to_bytes(self) -> bytes:
        """The file's bytes: readable JSON."""
        return (json.dumps({"kind": KIND, **asdict(self)}, indent=2, ensure_ascii=False) + "\n").encode()

    def expires(self) -> str:
        return dt.datetime.fromtimestamp(self.expires_at, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def certify(institution: str, key: Ed25519PrivateKey, worker_key: bytes, trust_class: str,
            expires_at: int) -> Certificate:
    """The certificate ``institution``, holding ``key``, gives the worker whose public key is ``worker_key``."""
    if not institution or institution == INDEPENDENT:
        raise CertificateError(f"institution {institution!r}: name the institution as the run admits it "
                               f"({INDEPENDENT!r} is what uncertified workers are called)")
    if trust_class not in CERTIFIED_CLASSES:
        raise CertificateError(f"class {trust_class!r}: a certificate grants one of {', '.join(CERTIFIED_CLASSES)}")
    if len(worker_key) != PUBLIC_KEY_BYTES:
        raise CertificateError(f"the worker's public key has {len(worker_key)} bytes, not {PUBLIC_KEY_BYTES}: "
                               "give the 64 hex digits `essaim worker id` prints")
    institution_key = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    unsigned = Certificate(institution, institution_key.hex(), worker_key.hex(), trust_class, int(expires_at), "")
    return Certificate(**{**asdict(unsigned), "signature": key.sign(unsigned.signed_bytes()).hex()})


def parse(data: bytes) -> Certificate:
    """The certificate in ``data``; CertificateError saying what is malformed. Nothing is verified here."""
    if len(data) > MAX_CERTIFICATE_BYTES:
        raise CertificateError(f"{len(data)} bytes: a certificate is at most {MAX_CERTIFICATE_BYTES}")
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise CertificateError(f"not a certificate: not JSON ({error})") from None
    if not isinstance(document, dict) or document.get("kind") != KIND or sorted(document) != sorted(FIELDS):
        raise CertificateError(f"not a certificate: expected a JSON object of kind {KIND!r} with exactly "
                               f"{', '.join(FIELDS)} (made by `essaim institution certify`)")
    document.pop("kind")
    texts = ("institution", "institution_key", "worker_key", "trust_class", "signature")
    if not all(isinstance(document[name], str) for name in texts) or not isinstance(document["expires_at"], int):
        raise CertificateError("malformed certificate: expires_at is unix seconds, every other field text")
    if not all(_is_hex(document[name], length) for name, length in
               (("institution_key", 64), ("worker_key", 64), ("signature", 128))):
        raise CertificateError("malformed certificate: its keys are 64 hex digits and its signature 128")
    return Certificate(**document)


def check(certificate: Certificate, worker_key: bytes, admitted: Mapping[str, str], now: float) -> None:
    """Nothing if ``certificate`` is to be credited to the worker holding ``worker_key`` at ``now``; else why not.

    ``admitted`` maps the run's admitted institutions to their public keys (hex). The
    reasons name only what the certificate itself says, never the admitted institutions.
    """
    if certificate.worker_key != worker_key.hex():
        raise CertificateError(f"the certificate is for worker key {certificate.worker_key[:16]}…, not this "
                               f"worker's {worker_key.hex()[:16]}… (give it the --identity it was issued for)")
    name = certificate.institution
    if name not in admitted:
        raise CertificateError(f"institution {name!r} is not admitted to this run")
    if admitted[name] != certificate.institution_key:
        raise CertificateError(f"the certificate is signed with key {certificate.institution_key[:16]}…, not the "
                               f"key this run admits {name!r} with")
    if not verify_signature(bytes.fromhex(certificate.institution_key), bytes.fromhex(certificate.signature),
                            certificate.signed_bytes()):
        raise CertificateError(f"the signature does not verify with {name!r}'s key (forged, or altered after "
                               "signing)")
    if certificate.trust_class not in CERTIFIED_CLASSES:
        raise CertificateError(f"class {certificate.trust_class!r} is not one a certificate grants "
                               f"({', '.join(CERTIFIED_CLASSES)})")
    if certificate.expires_at <= now:
        raise CertificateError(f"the certificate expired on {certificate.expires()}: ask {name!r} for a new one")


def read_certificate(path: Path, worker_key: bytes, now: float | None = None) -> bytes:
    """A worker's certificate file, checked before it is presented: readable, for this key, not expired.

    Whether its institution is admitted is for the coordinator to say at Register.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise CertificateError(f"--certificate {path}: cannot read it ({error})") from None
    try:
        certificate = parse(data)
        if certificate.worker_key != worker_key.hex():
            raise CertificateError(f"it certifies worker key {certificate.worker_key[:16]}…, not this worker's "
                                   f"{worker_key.hex()[:16]}… (join with the --identity it was issued for)")
        if certificate.expires_at <= (time.time() if now is None else now):
            raise CertificateError(f"it expired on {certificate.expires()}: ask {certificate.institution!r} for "
                                   "a new one")
    except CertificateError as error:
        raise CertificateError(f"--certificate {path}: {error}") from None
    return data


def _is_hex(text: str, length: int) -> bool:
    return len(text) == length and all(c in "0123456789abcdef" for c in text)
