"""Institution certificates: credited only when the admitted institution's own key signed them for this worker, in time."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.certificates import (
    MAX_CERTIFICATE_BYTES, Certificate, CertificateError, certify, check, parse, read_certificate,
)
from protocol.identity import Identity

NOW = 1_900_000_000.0
YEAR = 365 * 86400


@pytest.fixture(scope="module")
def genci() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def worker() -> Identity:
    return Identity.generate()


def admitted(key: Ed25519PrivateKey, name: str = "GENCI") -> dict[str, str]:
    return {name: certify(name, key, b"\0" * 32, "hpc", 0).institution_key, "Inria": "ab" * 32}


def test_a_certificate_survives_its_file_and_is_credited_by_the_run_that_admits_its_key(genci, worker) -> None:
    issued = certify("GENCI", genci, worker.public_key, "hpc", int(NOW) + YEAR)
    carried = parse(issued.to_bytes())
    assert carried == issued and (carried.institution, carried.trust_class) == ("GENCI", "hpc")
    check(carried, worker.public_key, admitted(genci), NOW)
    reindented = json.dumps(json.loads(issued.to_bytes()), indent=None).encode()  # whitespace is not signed
    check(parse(reindented), worker.public_key, admitted(genci), NOW)


def forged_with_the_admitted_key_named(genci: Ed25519PrivateKey, worker: Identity) -> Certificate:
    """A certificate an outsider signs with its own key, naming GENCI and GENCI's public key."""
    mine = certify("GENCI", Ed25519PrivateKey.generate(), worker.public_key, "hpc", int(NOW) + YEAR)
    return Certificate(**{**mine.__dict__, "institution_key": admitted(genci)["GENCI"]})


@pytest.mark.parametrize("make, reason", [
    (lambda k, w: certify("GENCI", k, Identity.generate().public_key, "hpc", int(NOW) + YEAR), "is for worker key"),
    (lambda k, w: certify("GENCI", k, w.public_key, "hpc", int(NOW) - 1), "expired on 2030-03-17"),
    (lambda k, w: certify("GENCI", Ed25519PrivateKey.generate(), w.public_key, "hpc", int(NOW) + YEAR),
     "not the key this run admits 'GENCI' with"),
    (forged_with_the_admitted_key_named, "signature does not verify with 'GENCI''s key"),
    (lambda k, w: Certificate(**{**certify("GENCI", k, w.public_key, "institution", int(NOW) + YEAR).__dict__,
                                 "trust_class": "hpc"}), "signature does not verify"),
    (lambda k, w: Certificate(**{**certify("GENCI", k, w.public_key, "hpc", int(NOW) + 60).__dict__,
                                 "expires_at": int(NOW) + 10 * YEAR}), "signature does not verify"),
    (lambda k, w: certify("CNRS", k, w.public_key, "hpc", int(NOW) + YEAR), "institution 'CNRS' is not admitted"),
])
def test_a_certificate_that_is_for_another_key_expired_forged_altered_or_unadmitted_is_not_credited(
    genci, worker, make, reason: str
) -> None:
    with pytest.raises(CertificateError, match=reason) as refused:
        check(parse(make(genci, worker).to_bytes()), worker.public_key, admitted(genci), NOW)
    assert "Inria" not in str(refused.value)  # a refusal never lists the admitted institutions


def test_a_signature_made_without_the_certificate_domain_tag_does_not_verify(genci, worker) -> None:
    """The same JSON signed for any other purpose (a ledger document, say) cannot pass for a certificate."""
    honest = certify("GENCI", genci, worker.public_key, "hpc", int(NOW) + YEAR)
    untagged = genci.sign(honest.signed_bytes().split(b"\n", 1)[1]).hex()
    with pytest.raises(CertificateError, match="signature does not verify"):
        check(Certificate(**{**honest.__dict__, "signature": untagged}), worker.public_key, admitted(genci), NOW)


@pytest.mark.parametrize("data, reason", [
    (b"not json", "not JSON"),
    (b'{"kind": "essaim-institution-certificate"}', "with exactly"),
    (json.dumps({"kind": "essaim-institution-certificate", "institution": "G", "institution_key": "00" * 32,
                 "worker_key": "00" * 32, "trust_class": "hpc", "expires_at": "soon", "signature": "00" * 64}).encode(),
     "expires_at is unix seconds"),
    (json.dumps({"kind": "essaim-institution-certificate", "institution": "G", "institution_key": "00",
                 "worker_key": "00" * 32, "trust_class": "hpc", "expires_at": 1, "signature": "00" * 64}).encode(),
     "64 hex digits"),
    (b" " * (MAX_CERTIFICATE_BYTES + 1), "at most 4096"),
])
def test_a_malformed_certificate_is_refused_saying_what_is_wrong(data: bytes, reason: str) -> None:
    with pytest.raises(CertificateError, match=reason):
        parse(data)


def test_no_certificate_names_the_uncertified_or_grants_the_volunteer_class(genci, worker) -> None:
    with pytest.raises(CertificateError, match="'independent' is what uncertified workers are called"):
        certify("independent", genci, worker.public_key, "institution", int(NOW))
    with pytest.raises(CertificateError, match="grants one of hpc, institution"):
        certify("GENCI", genci, worker.public_key, "volunteer", int(NOW))


def test_a_worker_checks_its_certificate_file_before_presenting_it(genci, worker, tmp_path: Path) -> None:
    path = tmp_path / "worker.cert"
    path.write_bytes(certify("GENCI", genci, worker.public_key, "hpc", int(time.time()) + 60).to_bytes())
    assert read_certificate(path, worker.public_key) == path.read_bytes()
    with pytest.raises(CertificateError, match=f"--certificate {path}: it certifies worker key .* not this worker's"):
        read_certificate(path, Identity.generate().public_key)
    with pytest.raises(CertificateError, match="it expired on .*: ask 'GENCI' for a new one"):
        read_certificate(path, worker.public_key, now=time.time() + 120)
    with pytest.raises(CertificateError, match="cannot read it"):
        read_certificate(tmp_path / "missing.cert", worker.public_key)
