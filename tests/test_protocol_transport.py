"""TLS and plaintext rules between coordinator and workers, on real gRPC servers over 127.0.0.1."""

from __future__ import annotations

import datetime
import os
from concurrent import futures
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from protocol.transport import (
    ClientTLS,
    ServerTLS,
    TransportError,
    add_listening_port,
    is_loopback,
    open_channel,
    split_address,
    write_self_signed,
)

ECHO = "/essaim.test.Echo/Echo"


def start_server(tls: ServerTLS | None, host: str = "127.0.0.1", insecure: bool = False) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("essaim.test.Echo", {"Echo": handler})])
    port = add_listening_port(server, host, 0, tls, insecure)
    server.start()
    return server, port


def echo(channel: grpc.Channel) -> bytes:
    with channel:
        return channel.unary_unary(ECHO)(b"ping", timeout=5)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A certificate that names only another host: 127.0.0.1 is not in its SAN."""
    return write_self_signed(tmp_path_factory.mktemp("cert"), ["coordinator.example"])


@pytest.fixture(scope="module")
def tls_server(pair: tuple[Path, Path]) -> Iterator[tuple[ServerTLS, int]]:
    tls = ServerTLS.load(*pair)
    server, port = start_server(tls)
    yield tls, port
    server.stop(None)


def write_cert(path: Path, key: ec.EllipticCurvePrivateKey, not_before: datetime.datetime, not_after: datetime.datetime) -> None:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_client_with_the_ca_talks_over_tls(tmp_path: Path) -> None:
    cert, key = write_self_signed(tmp_path, ["127.0.0.1", "localhost"])
    assert cert.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert os.stat(key).st_mode & 0o777 == 0o600
    server, port = start_server(ServerTLS.load(cert, key))
    try:
        assert echo(open_channel(f"127.0.0.1:{port}", ClientTLS(ca_cert=cert), [])) == b"ping"
        assert echo(open_channel(f"localhost:{port}", ClientTLS(ca_cert=cert), [])) == b"ping"
    finally:
        server.stop(None)


def test_pinned_fingerprint_authenticates_whatever_name_the_cert_has(tls_server: tuple[ServerTLS, int]) -> None:
    tls, port = tls_server
    assert tls.fingerprint().startswith("sha256:") and len(tls.fingerprint()) == 7 + 64
    assert echo(open_channel(f"127.0.0.1:{port}", ClientTLS(fingerprint=tls.fingerprint()), [])) == b"ping"
    upper = tls.fingerprint().upper().replace("SHA256:", "")
    assert echo(open_channel(f"127.0.0.1:{port}", ClientTLS(fingerprint=upper), [])) == b"ping"


def test_a_wrong_fingerprint_is_refused_before_any_rpc(tls_server: tuple[ServerTLS, int]) -> None:
    tls, port = tls_server
    wrong = "sha256:" + "0" * 64
    with pytest.raises(TransportError, match="not the one you pinned") as caught:
        open_channel(f"127.0.0.1:{port}", ClientTLS(fingerprint=wrong), [])
    assert wrong in str(caught.value) and tls.fingerprint() in str(caught.value)
    with pytest.raises(TransportError, match="64 hex"):
        open_channel(f"127.0.0.1:{port}", ClientTLS(fingerprint="sha256:abc"), [])


def test_a_pin_against_a_plaintext_server_or_nothing_says_so() -> None:
    server, port = start_server(None)
    pin = "sha256:" + "0" * 64
    try:
        with pytest.raises(TransportError, match="does not speak TLS"):
            open_channel(f"127.0.0.1:{port}", ClientTLS(fingerprint=pin), [])
    finally:
        server.stop(None)
    with pytest.raises(TransportError, match="nothing answers"):
        open_channel(f"127.0.0.1:{port}", ClientTLS(fingerprint=pin), [])


def test_a_ca_that_did_not_sign_the_cert_fails_the_first_call(tls_server: tuple[ServerTLS, int], tmp_path: Path) -> None:
    """gRPC connects lazily: the channel opens, the first RPC fails UNAVAILABLE (CERTIFICATE_VERIFY_FAILED)."""
    _, port = tls_server
    other_cert, _ = write_self_signed(tmp_path, ["coordinator.example"])
    channel = open_channel(f"127.0.0.1:{port}", ClientTLS(ca_cert=other_cert), [])
    with pytest.raises(grpc.RpcError) as caught:
        echo(channel)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "CERTIFICATE_VERIFY_FAILED" in caught.value.details()


def test_a_plaintext_client_cannot_talk_to_a_tls_server(tls_server: tuple[ServerTLS, int]) -> None:
    _, port = tls_server
    with pytest.raises(grpc.RpcError) as caught:
        echo(open_channel(f"127.0.0.1:{port}", ClientTLS(), []))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_plaintext_is_refused_off_loopback_unless_asked_for() -> None:
    with pytest.raises(TransportError, match="--coordinator-fingerprint"):
        open_channel("10.0.0.5:50051", ClientTLS(), [])
    open_channel("10.0.0.5:50051", ClientTLS(insecure=True), []).close()
    open_channel("[::1]:50051", ClientTLS(), []).close()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    try:
        with pytest.raises(TransportError, match="--tls-cert/--tls-key"):
            add_listening_port(server, "0.0.0.0", 0, None, insecure=False)
        with pytest.raises(TransportError, match="not this machine's"):
            add_listening_port(server, "192.0.2.1", 0, None, insecure=True)
    finally:
        server.stop(None)


def test_contradictory_client_settings_are_refused(pair: tuple[Path, Path]) -> None:
    pin = "sha256:" + "0" * 64
    with pytest.raises(TransportError, match="not both"):
        open_channel("127.0.0.1:1", ClientTLS(ca_cert=pair[0], fingerprint=pin), [])
    with pytest.raises(TransportError, match="--insecure turns TLS off"):
        open_channel("127.0.0.1:1", ClientTLS(ca_cert=pair[0], insecure=True), [])
    with pytest.raises(TransportError, match="cannot read the CA certificate"):
        open_channel("127.0.0.1:1", ClientTLS(ca_cert=pair[0].parent / "missing.pem"), [])


def test_load_refuses_a_key_of_another_cert(pair: tuple[Path, Path], tmp_path: Path) -> None:
    _, other_key = write_self_signed(tmp_path, ["coordinator.example"])
    with pytest.raises(TransportError, match="is not the key of"):
        ServerTLS.load(pair[0], other_key)


def test_load_refuses_an_expired_cert(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    write_cert(tmp_path / "cert.pem", key, now - datetime.timedelta(days=30), now - datetime.timedelta(days=1))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    with pytest.raises(TransportError, match="expired on .*essaim coordinator cert"):
        ServerTLS.load(tmp_path / "cert.pem", tmp_path / "key.pem")


def test_a_pinned_but_expired_cert_is_refused_by_the_worker(tmp_path: Path) -> None:
    """A coordinator can serve an expired certificate (gRPC does not check its own); the pin path says so."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    write_cert(tmp_path / "cert.pem", key, now - datetime.timedelta(days=30), now - datetime.timedelta(days=1))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    tls = ServerTLS((tmp_path / "cert.pem").read_bytes(), key_pem)
    server, port = start_server(tls)
    try:
        with pytest.raises(TransportError, match="expired on .*the run's host must make a new one"):
            open_channel(f"127.0.0.1:{port}", ClientTLS(fingerprint=tls.fingerprint()), [])
    finally:
        server.stop(None)


def test_load_refuses_missing_and_non_pem_files(pair: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="cannot read the certificate .*check the path"):
        ServerTLS.load(tmp_path / "nope.pem", pair[1])
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(TransportError, match="is not a PEM certificate"):
        ServerTLS.load(tmp_path / "junk.pem", pair[1])
    with pytest.raises(TransportError, match="is not an unencrypted PEM private key"):
        ServerTLS.load(pair[0], tmp_path / "junk.pem")


def test_write_self_signed_refuses_to_overwrite(pair: tuple[Path, Path]) -> None:
    with pytest.raises(TransportError, match="exists"):
        write_self_signed(pair[0].parent, ["coordinator.example"])


@pytest.mark.parametrize(
    ("host", "expected"),
    [("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("coordinator.example", False)],
)
def test_is_loopback(host: str, expected: bool) -> None:
    assert is_loopback(host) is expected


def test_split_address() -> None:
    assert split_address("10.0.0.5:50051") == ("10.0.0.5", 50051)
    assert split_address("[::1]:50051") == ("::1", 50051)
    assert split_address("coordinator.example:443") == ("coordinator.example", 443)
    for bad in ("10.0.0.5", ":50051", "host:port", "host:70000", "::1:50051", ""):
        with pytest.raises(TransportError):
            split_address(bad)
