"""Register's checks: only an admitted institution's certificate credits a worker, and one address cannot flood."""

from __future__ import annotations

import re
import time

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select

from coordinator.admission import Admission, Refused, RegistrationLimit
from coordinator.store import Worker
from protocol import essaim_pb2 as pb
from protocol import essaim_pb2_grpc
from protocol.auth import RequestVerifier, sign_request
from protocol.certificates import ADMISSION_NOTE_METADATA, certify
from protocol.identity import Identity

PEER = "ipv4:203.0.113.7:51234"
YEAR = 365 * 86400


@pytest.fixture(scope="module")
def genci() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_hex(key: Ed25519PrivateKey) -> str:
    return certify("x", key, b"\0" * 32, "hpc", 0).institution_key


def register_request(identity: Identity, institution: str = "", trust_class: str = "",
                     certificate: bytes = b"") -> pb.RegisterRequest:
    request = pb.RegisterRequest(public_key=identity.public_key, name="w", institution=institution,
                                 trust_class=trust_class, institution_certificate=certificate)
    return sign_request("Register", request, identity)


def certificate_for(identity: Identity, key: Ed25519PrivateKey, name: str = "GENCI", trust_class: str = "hpc",
                    expires_at: float | None = None) -> bytes:
    return certify(name, key, identity.public_key, trust_class,
                   int(expires_at if expires_at is not None else time.time() + YEAR)).to_bytes()


def admission(genci: Ed25519PrivateKey, institutions_only: bool = False, per_minute: int = 60,
              burst: int = 20, clock=time.monotonic) -> Admission:  # type: ignore[no-untyped-def]
    admitted = {"GENCI": public_hex(genci), "Inria": public_hex(Ed25519PrivateKey.generate())}
    return Admission(RequestVerifier(), lambda: admitted, RegistrationLimit(per_minute, burst, clock), institutions_only)


def never_registered(_worker_id: str) -> bool:
    return False


# --- what a worker is credited as ------------------------------------------------------------------


def test_a_worker_typing_an_admitted_institution_without_a_certificate_is_a_volunteer_of_no_institution(genci) -> None:
    admitted = admission(genci).admit(register_request(Identity.generate(), "GENCI", "hpc"), PEER, never_registered)
    assert (admitted.institution, admitted.trust_class) == ("independent", "volunteer")
    assert "institution 'GENCI' and class 'hpc' not credited: it presented no certificate" in admitted.note
    assert "Inria" not in admitted.note


def test_a_worker_that_claims_nothing_is_a_volunteer_and_told_nothing(genci) -> None:
    admitted = admission(genci).admit(register_request(Identity.generate(), "independent", "volunteer"), PEER,
                                      never_registered)
    assert (admitted.institution, admitted.trust_class, admitted.note) == ("independent", "volunteer", "")


def test_a_valid_certificate_credits_its_institution_and_class_whatever_the_worker_typed(genci) -> None:
    worker = Identity.generate()
    admitted = admission(genci).admit(register_request(worker, "Inria", certificate=certificate_for(worker, genci)),
                                      PEER, never_registered)
    assert (admitted.institution, admitted.trust_class) == ("GENCI", "hpc")
    assert "credited to 'GENCI', as its certificate says, not to the 'Inria' it typed" in admitted.note


@pytest.mark.parametrize("make_certificate, reason", [
    (lambda w, k: certificate_for(w, Ed25519PrivateKey.generate()), "not the key this run admits 'GENCI' with"),
    (lambda w, k: certificate_for(w, k, expires_at=time.time() - 1), "expired on"),
    (lambda w, k: certificate_for(Identity.generate(), k), "is for worker key"),
    (lambda w, k: certificate_for(w, k, name="CNRS"), "institution 'CNRS' is not admitted to this run"),
    (lambda w, k: certificate_for(w, k).replace(b'"hpc"', b'"institution"'), "signature does not verify"),
    (lambda w, k: b"{not a certificate", "not JSON"),
])
def test_a_forged_expired_other_key_or_unadmitted_certificate_credits_nothing(genci, make_certificate,
                                                                              reason: str) -> None:
    worker = Identity.generate()
    request = register_request(worker, "GENCI", certificate=make_certificate(worker, genci))
    admitted = admission(genci).admit(request, PEER, never_registered)
    assert (admitted.institution, admitted.trust_class) == ("independent", "volunteer")
    assert "its certificate is not credited" in admitted.note and reason in admitted.note
    assert "Inria" not in admitted.note


def test_a_run_of_institutions_only_refuses_the_uncertified_without_naming_who_is_admitted(genci) -> None:
    strict = admission(genci, institutions_only=True)
    with pytest.raises(Refused, match="admits only workers certified by an institution it admits") as refused:
        strict.admit(register_request(Identity.generate(), "GENCI"), PEER, never_registered)
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "Inria" not in str(refused.value) and "essaim institution certify" in str(refused.value)
    worker = Identity.generate()
    assert strict.admit(register_request(worker, certificate=certificate_for(worker, genci)), PEER,
                        never_registered).institution == "GENCI"


@pytest.mark.parametrize("request_fields, message", [
    ({"trust_class": "friend"}, "trust_class 'friend' is not one of hpc, institution, volunteer"),
    ({"precision": "fp8"}, "precision 'fp8' is not one of fp32, bf16"),
    ({"bandwidth_mbit": -1.0}, "must be 0 (unknown, open-ended) or positive"),
    ({"public_key": b"short"}, "public_key must be a raw 32-byte Ed25519 key, got 5 bytes"),
])
def test_a_malformed_register_request_is_refused_before_anything_else(genci, request_fields: dict,
                                                                      message: str) -> None:
    identity = Identity.generate()
    request = pb.RegisterRequest(public_key=identity.public_key)
    for name, value in request_fields.items():
        setattr(request, name, value)
    with pytest.raises(Refused, match=re.escape(message)) as refused:
        admission(genci).admit(sign_request("Register", request, identity), PEER, never_registered)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT


# --- how fast one address may register -----------------------------------------------------------


def test_ten_thousand_registrations_from_one_address_are_refused_past_the_burst_before_any_signature_check(
    genci,
) -> None:
    now = [1000.0]
    gate = admission(genci, per_minute=60, burst=20, clock=lambda: now[0])
    identities = [Identity.generate() for _ in range(10_000)]
    requests = [register_request(identity) for identity in identities]
    for request in requests[20:]:
        request.auth.signature = b"\0" * 64  # forged: a flood need not even sign, it is refused before that
    accepted, refused = [], []
    for request in requests:
        try:
            accepted.append(gate.admit(request, PEER, never_registered))
        except Refused as error:
            refused.append(error)
    assert len(accepted) == 20 and len(refused) == 9_980
    assert {error.code for error in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}  # not UNAUTHENTICATED
    assert str(refused[0]) == "Register: too many registrations from 203.0.113.7: 60 per minute allowed; wait 1 s"
    # Another address is not held back by this one; a key already registered comes back freely.
    assert gate.admit(register_request(Identity.generate()), "ipv4:198.51.100.2:4000", never_registered)
    again = register_request(identities[0])
    assert gate.admit(again, PEER, registered=lambda worker_id: worker_id == identities[0].worker_id)
    # The bucket refills: a minute later, 60 new keys more (the burst caps what one pause earns).
    now[0] += 60.0
    assert sum(_admitted(gate, register_request(identity)) for identity in identities[20:100]) == 20


def test_the_wait_grows_with_the_deficit_and_idle_addresses_are_forgotten() -> None:
    now = [0.0]
    limit = RegistrationLimit(per_minute=6, burst=2, clock=lambda: now[0])  # one token every 10 s
    assert (limit.take("a"), limit.take("a")) == (0.0, 0.0)
    assert limit.take("a") == pytest.approx(10.0)
    now[0] += 4.0
    assert limit.take("a") == pytest.approx(6.0)
    now[0] += 1000.0
    limit.take("b")  # a sweep: "a" has been full for long, so it is forgotten
    assert set(limit._buckets) == {"b"}


def _admitted(gate: Admission, request: pb.RegisterRequest) -> bool:
    try:
        gate.admit(request, PEER, never_registered)
    except Refused:
        return False
    return True


# --- over gRPC, against a real coordinator -------------------------------------------------------


def test_a_coordinator_refuses_registrations_past_its_limit_with_when_to_retry(start_coordinator) -> None:
    coordinator = start_coordinator(extra=("--registrations-per-minute", "1", "--registration-burst", "3"))
    channel = grpc.insecure_channel(coordinator.address)
    stub = essaim_pb2_grpc.CoordinatorStub(channel)
    first = Identity.generate()
    assert stub.Register(register_request(first), timeout=5).worker_id == first.worker_id
    for _ in range(2):
        stub.Register(register_request(Identity.generate()), timeout=5)
    with pytest.raises(grpc.RpcError) as refused:
        stub.Register(register_request(Identity.generate()), timeout=5)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "too many registrations from 127.0.0.1: 1 per minute allowed; wait " in refused.value.details()
    assert stub.Register(register_request(first), timeout=5).worker_id == first.worker_id  # a restart: not counted
    with coordinator.sessions()() as session:
        assert len(session.scalars(select(Worker)).all()) == 3
    channel.close()


def test_a_coordinator_credits_certified_workers_and_tells_an_uncertified_one_why_not(start_coordinator, genci) -> None:
    coordinator = start_coordinator(extra=(f"--admit-institution=GENCI={public_hex(genci)}",
                                           f"--admit-institution=Inria={public_hex(Ed25519PrivateKey.generate())}"))
    channel = grpc.insecure_channel(coordinator.address)
    stub = essaim_pb2_grpc.CoordinatorStub(channel)
    certified, typed = Identity.generate(), Identity.generate()
    _, call = stub.Register.with_call(register_request(certified, certificate=certificate_for(certified, genci)),
                                      timeout=5)
    assert ADMISSION_NOTE_METADATA not in dict(call.trailing_metadata())
    _, call = stub.Register.with_call(register_request(typed, "GENCI", "hpc"), timeout=5)
    note = dict(call.trailing_metadata())[ADMISSION_NOTE_METADATA].decode()
    assert "institution 'GENCI' and class 'hpc' not credited: it presented no certificate" in note
    assert "Inria" not in note
    with coordinator.sessions()() as session:
        rows = {w.id: (w.institution, w.trust_class) for w in session.scalars(select(Worker))}
    assert rows == {certified.worker_id: ("GENCI", "hpc"), typed.worker_id: ("independent", "volunteer")}
    assert "not credited" in coordinator.log.read_text()
    channel.close()
