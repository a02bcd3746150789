import time

import pytest

from protocol import essaim_pb2 as pb
from protocol.auth import AuthError, RequestVerifier, sign_request
from protocol.identity import Identity, verify_signature, worker_id_for


@pytest.fixture(scope="module")
def identity() -> Identity:
    return Identity.generate()


def signed_heartbeat(identity: Identity, round_number: int = 3) -> pb.HeartbeatRequest:
    return sign_request("Heartbeat", pb.HeartbeatRequest(round=round_number, loss=2.5), identity)


def test_signed_request_verifies_once_and_its_replay_is_refused(identity: Identity) -> None:
    verifier = RequestVerifier()
    request = signed_heartbeat(identity)
    verifier.verify("Heartbeat", request, identity.public_key)
    with pytest.raises(AuthError, match="replayed"):
        verifier.verify("Heartbeat", request, identity.public_key)


def test_tampered_field_breaks_the_signature(identity: Identity) -> None:
    request = signed_heartbeat(identity)
    request.round = 4
    with pytest.raises(AuthError, match="bad signature"):
        RequestVerifier().verify("Heartbeat", request, identity.public_key)


def test_signature_is_bound_to_the_method(identity: Identity) -> None:
    request = sign_request("GetRunConfig", pb.GetRunConfigRequest(), identity)
    with pytest.raises(AuthError, match="bad signature"):
        RequestVerifier().verify("Register", request, identity.public_key)


def test_another_key_cannot_sign_for_a_worker(identity: Identity) -> None:
    forger = Identity.generate()
    request = signed_heartbeat(forger)
    request.auth.worker_id = identity.worker_id
    with pytest.raises(AuthError, match="bad signature"):
        RequestVerifier().verify("Heartbeat", request, identity.public_key)


def test_unsigned_request_is_refused(identity: Identity) -> None:
    request = pb.HeartbeatRequest(round=1)
    request.auth.worker_id = identity.worker_id
    with pytest.raises(AuthError, match="not signed"):
        RequestVerifier().verify("Heartbeat", request, identity.public_key)


def test_stale_timestamp_is_refused_even_with_a_valid_signature(identity: Identity) -> None:
    request = signed_heartbeat(identity)
    verifier = RequestVerifier(max_skew_seconds=60, clock=lambda: time.time() + 3600)
    with pytest.raises(AuthError, match="timestamp"):
        verifier.verify("Heartbeat", request, identity.public_key)


def test_a_refused_timestamp_says_how_far_and_which_way_the_workers_clock_is_off(identity: Identity) -> None:
    now = 1_800_000_000.0
    verifier = RequestVerifier(max_skew_seconds=120, clock=lambda: now)
    ahead = sign_request("Heartbeat", pb.HeartbeatRequest(), identity, now=lambda: now + 300)
    with pytest.raises(AuthError, match=r"clock is 300 s ahead of the coordinator's \(limit 120 s\).*NTP"):
        verifier.verify("Heartbeat", ahead, identity.public_key)
    behind = sign_request("Heartbeat", pb.HeartbeatRequest(), identity, now=lambda: now - 300)
    with pytest.raises(AuthError, match=r"clock is 300 s behind the coordinator's \(limit 120 s\)"):
        verifier.verify("Heartbeat", behind, identity.public_key)
    close = sign_request("Heartbeat", pb.HeartbeatRequest(), identity, now=lambda: now - 119)
    verifier.verify("Heartbeat", close, identity.public_key)  # off, but inside the window: accepted


def test_nonces_are_forgotten_only_after_their_window(identity: Identity) -> None:
    now = [time.time()]
    verifier = RequestVerifier(max_skew_seconds=60, clock=lambda: now[0])
    first = signed_heartbeat(identity)
    verifier.verify("Heartbeat", first, identity.public_key)
    now[0] += 30
    with pytest.raises(AuthError, match="replayed"):
        verifier.verify("Heartbeat", first, identity.public_key)
    now[0] += 100  # the nonce is forgotten, but the timestamp is now stale: still refused
    with pytest.raises(AuthError, match="timestamp"):
        verifier.verify("Heartbeat", first, identity.public_key)


def test_identity_round_trips_through_its_key_file(tmp_path) -> None:
    path = tmp_path / "keys" / "worker.key"
    created = Identity.load_or_create(path)
    loaded = Identity.load_or_create(path)
    assert loaded.public_key == created.public_key
    assert loaded.worker_id == worker_id_for(created.public_key)
    assert path.stat().st_mode & 0o077 == 0
    assert verify_signature(created.public_key, loaded.sign(b"m"), b"m")


def test_a_key_file_that_is_not_a_key_gets_a_clear_error(tmp_path) -> None:
    path = tmp_path / "worker.key"
    path.write_text("not a key")
    with pytest.raises(ValueError, match="not a PEM Ed25519 private key"):
        Identity.load_or_create(path)
