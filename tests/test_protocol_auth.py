import time

import pytest

from protocol import essaim_pb2 as pb
from protocol.auth import AuthError, NoncesExhausted, RequestVerifier, sign_request
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


def test_a_worker_past_its_nonce_cap_is_told_to_slow_down_while_others_still_pass(identity: Identity) -> None:
    now = [1_800_000_000.0]
    verifier = RequestVerifier(max_skew_seconds=60, clock=lambda: now[0], max_nonces_per_worker=3)
    sent = [sign_request("Heartbeat", pb.HeartbeatRequest(), identity, now=lambda: now[0]) for _ in range(4)]
    for request in sent[:3]:
        verifier.verify("Heartbeat", request, identity.public_key)
    with pytest.raises(NoncesExhausted, match=r"worker .* sent 3 signed requests within the last 60 s.*slow down"):
        verifier.verify("Heartbeat", sent[3], identity.public_key)
    with pytest.raises(AuthError, match="replayed"):  # a replay is still named a replay, cap or not
        verifier.verify("Heartbeat", sent[0], identity.public_key)
    other = Identity.generate()
    verifier.verify("Heartbeat", sign_request("Heartbeat", pb.HeartbeatRequest(), other, now=lambda: now[0]),
                    other.public_key)
    now[0] += 2 * 60  # the first requests' timestamps are stale: their nonces are forgotten
    verifier.verify("Heartbeat", sign_request("Heartbeat", pb.HeartbeatRequest(), identity, now=lambda: now[0]),
                    identity.public_key)
    assert verifier.remembered == 1


def test_past_the_nonce_cap_new_requests_are_refused_and_no_remembered_nonce_is_forgotten() -> None:
    now = [1_800_000_000.0]
    verifier = RequestVerifier(max_skew_seconds=60, clock=lambda: now[0], max_nonces=3)
    workers = [Identity.generate() for _ in range(4)]
    sent = [sign_request("Heartbeat", pb.HeartbeatRequest(), worker, now=lambda: now[0]) for worker in workers]
    for worker, request in zip(workers[:3], sent[:3]):
        verifier.verify("Heartbeat", request, worker.public_key)
    with pytest.raises(NoncesExhausted, match=r"already remembers 3 request nonces .*max_nonces.*retry in a few seconds"):
        verifier.verify("Heartbeat", sent[3], workers[3].public_key)
    now[0] += 50  # inside the window: every nonce is still remembered, so replays are still caught
    for worker, request in zip(workers[:3], sent[:3]):
        with pytest.raises(AuthError, match="replayed"):
            verifier.verify("Heartbeat", request, worker.public_key)
    now[0] += 70  # past the window: the old nonces are gone and new requests pass again
    verifier.verify("Heartbeat", sign_request("Heartbeat", pb.HeartbeatRequest(), workers[3], now=lambda: now[0]),
                    workers[3].public_key)
    assert verifier.remembered == 1


def test_old_nonces_are_forgotten_as_they_expire_while_recent_ones_still_catch_replays(identity: Identity) -> None:
    base = 1_800_000_000.0
    now = [base]
    verifier = RequestVerifier(max_skew_seconds=64, clock=lambda: now[0])
    sent = []
    for second in range(64):  # one request a second for a whole window
        now[0] = base + second
        sent.append(sign_request("Heartbeat", pb.HeartbeatRequest(), identity, now=lambda: now[0]))
        verifier.verify("Heartbeat", sent[-1], identity.public_key)
    now[0] = base + 64 + 32  # the first half's timestamps are stale by now, the second half's not
    with pytest.raises(AuthError, match="replayed"):
        verifier.verify("Heartbeat", sent[-1], identity.public_key)
    # The 32 still acceptable are remembered, with at most two slots' worth (2 x 64/16 s) kept late.
    assert 32 <= verifier.remembered <= 32 + 8


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
