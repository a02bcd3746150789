"""TLS between the coordinator and its workers, or plaintext only where nobody can listen in.

Workers send signed requests, but a signature does not hide what is said nor prove to the
worker who answers: on any address but loopback the channel must be TLS. A worker checks the
coordinator either against a CA (--ca-cert) or against the certificate's SHA-256 fingerprint,
which the coordinator prints at start (--coordinator-fingerprint): a pin needs no CA and no
DNS name, so a self-signed certificate on a bare IP address is enough.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PROBE_TIMEOUT_S = 5.0


class TransportError(ValueError):
    """A transport setting or peer certificate that must be refused; message says what to do."""


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def is_loopback(host: str) -> bool:
    """True when only this machine can reach host, the one case where plaintext is harmless."""
    if host.lower() in ("localhost", "localhost."):
        return True
    address = _ip(host)
    mapped = getattr(address, "ipv4_mapped", None)
    return address is not None and (address.is_loopback or (mapped is not None and mapped.is_loopback))


def plaintext_allowed(host: str, insecure: bool) -> bool:
    """The one rule for every Essaim and Flower endpoint: plaintext on loopback, elsewhere only when asked for."""
    return insecure or is_loopback(host)


def split_address(address: str) -> tuple[str, int]:
    """"HOST:PORT" or "[IPv6]:PORT" -> (host, port), host without brackets."""
    host, sep, port_text = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise TransportError(f"{address!r}: write an IPv6 address in brackets, as [::1]:50051")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise TransportError(f"{address!r} is not HOST:PORT (for example 10.0.0.5:50051)")
    return host, int(port_text)


def _fingerprint(der: bytes) -> str:
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _check_dates(cert: x509.Certificate, what: str, who: str) -> None:
    """Refuse here what TLS would refuse later, as a bare 'handshake failed' on every worker."""
    now = datetime.datetime.now(datetime.timezone.utc)
    if cert.not_valid_after_utc < now:
        raise TransportError(
            f"{what} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: {who} must make a new one "
            "(essaim coordinator cert) and give workers its fingerprint"
        )
    if cert.not_valid_before_utc > now:
        raise TransportError(f"{what} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC: check the clocks")


def _read(path: Path, what: str) -> bytes:
    """The file's bytes, or an error naming it: a typo in a path is the commonest failure."""
    try:
        return path.read_bytes()
    except OSError as error:
        raise TransportError(f"cannot read the {what} {path}: {error.strerror or error}; check the path") from error


@dataclass(frozen=True)
class ServerTLS:
    """The coordinator's certificate (PEM, leaf first, then any intermediates) and its key."""

    cert_pem: bytes
    key_pem: bytes

    @classmethod
    def from_options(cls, cert_path: Path | None, key_path: Path | None) -> "ServerTLS | None":
        """--tls-cert and --tls-key: both (TLS), or neither (None)."""
        if (cert_path is None) != (key_path is None):
            raise TransportError("give --tls-cert and --tls-key together (a certificate and its private key)")
        return cls.load(cert_path, key_path) if cert_path and key_path else None

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> "ServerTLS":
        """Read and check the pair now, so a bad file stops the coordinator, not each worker."""
        cert_pem, key_pem = _read(cert_path, "certificate"), _read(key_path, "key")
        try:
            cert = x509.load_pem_x509_certificates(cert_pem)[0]
        except ValueError as error:
            raise TransportError(f"{cert_path} is not a PEM certificate ({error})") from error
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as error:
            raise TransportError(f"{key_path} is not an unencrypted PEM private key ({error}); decrypt it") from error
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
            raise TransportError(f"{key_path} is not the key of {cert_path}: give the key made with that certificate")
        _check_dates(cert, f"the certificate {cert_path}", "you")
        return cls(cert_pem, key_pem)

    def fingerprint(self) -> str:
        """What workers pin: "sha256:" + hex digest of the leaf certificate's DER bytes."""
        cert = x509.load_pem_x509_certificates(self.cert_pem)[0]
        return _fingerprint(cert.public_bytes(serialization.Encoding.DER))

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)])


def add_listening_port(server: grpc.Server, host: str, port: int, tls: ServerTLS | None, insecure: bool) -> int:
    """Bind host:port with TLS, or plaintext on loopback or when insecure is asked for; the bound port."""
    if tls is None and not plaintext_allowed(host, insecure):
        raise TransportError(
            f"refusing to serve plaintext on {host}: workers' traffic would be readable and forgeable "
            "on the network; pass --tls-cert/--tls-key (essaim coordinator cert makes a pair), or --insecure"
        )
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(target) if tls is None else server.add_secure_port(target, tls.credentials())
    except RuntimeError:
        bound = 0
    if not bound:
        raise TransportError(f"cannot listen on {target}: the port is in use or the address is not this machine's")
    return bound


@dataclass(frozen=True)
class ClientTLS:
    """How a worker checks the coordinator: a CA, a pinned fingerprint, or (explicitly) nothing."""

    ca_cert: Path | None = None
    fingerprint: str = ""
    insecure: bool = False


def _normalised_pin(pin: str) -> str:
    """Accept the printed form, upper case or colon-separated hex too; refuse anything else."""
    digest = pin.strip().lower().removeprefix("sha256:").replace(":", "")
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise TransportError(f"--coordinator-fingerprint {pin!r} is not sha256:<64 hex>, as `essaim coordinator serve` prints")
    return "sha256:" + digest


def _server_certificate(host: str, port: int) -> bytes:
    """The coordinator's leaf certificate (DER), fetched without verification: the pin checks it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S) as raw:
            with context.wrap_socket(raw, server_hostname=None if _ip(host) else host) as tls:
                der = tls.getpeercert(binary_form=True)
    except ssl.SSLError as error:
        raise TransportError(
            f"{host}:{port} does not speak TLS ({error.reason or error}): if the coordinator runs "
            "with --insecure, pass --insecure here too, else check the address"
        ) from error
    except OSError as error:
        raise TransportError(f"nothing answers at {host}:{port} ({error}): is the coordinator up, the address right?") from error
    return der


def _name_in(cert: x509.Certificate) -> str:
    """A name the certificate vouches for, so gRPC's host name check passes whatever address we dialled."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n) for kind in (x509.DNSName, x509.IPAddress) for n in san.get_values_for_type(kind)]
    except x509.ExtensionNotFound:
        names = []
    names += [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if not names:
        raise TransportError("the coordinator's certificate names no host (no SAN, no CN): make one with essaim coordinator cert")
    return names[0]


def open_channel(address: str, tls: ClientTLS, options: list[tuple[str, Any]]) -> grpc.Channel:
    """A channel to the coordinator, verified as tls says; errors before any RPC when refused.

    A CA that did not sign the coordinator's certificate is only found out at the first RPC
    (gRPC connects lazily): it fails with StatusCode.UNAVAILABLE, details CERTIFICATE_VERIFY_FAILED.
    """
    host, port = split_address(address)
    if tls.insecure and (tls.ca_cert is not None or tls.fingerprint):
        raise TransportError("--insecure turns TLS off: it cannot go with --ca-cert or --coordinator-fingerprint")
    if tls.ca_cert is not None and tls.fingerprint:
        raise TransportError("pass --ca-cert or --coordinator-fingerprint, not both: choose one way to check the coordinator")
    if tls.ca_cert is not None:
        root = _read(tls.ca_cert, "CA certificate")
        try:
            x509.load_pem_x509_certificates(root)
        except ValueError as error:
            raise TransportError(f"{tls.ca_cert} is not a PEM certificate ({error})") from error
        return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=root), options=options)
    if tls.fingerprint:
        pin = _normalised_pin(tls.fingerprint)
        der = _server_certificate(host, port)
        if _fingerprint(der) != pin:
            raise TransportError(
                f"the coordinator at {address} presents {_fingerprint(der)}, you pinned {pin}: the coordinator's "
                "certificate is not the one you pinned: check --coordinator-fingerprint with the run's host"
            )
        cert = x509.load_der_x509_certificate(der)
        _check_dates(cert, f"the coordinator's certificate at {address}", "the run's host")
        # gRPC trusts the pinned certificate itself as the root, so the handshake still proves
        # the coordinator holds its key; the name override only skips matching the dialled address.
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.public_bytes(serialization.Encoding.PEM))
        override = [("grpc.ssl_target_name_override", _name_in(cert))]
        return grpc.secure_channel(address, credentials, options=list(options) + override)
    if not plaintext_allowed(host, tls.insecure):
        raise TransportError(
            f"refusing plaintext to {host}: pass --ca-cert or --coordinator-fingerprint (printed by "
            "`essaim coordinator serve` at start), or --insecure to send in the clear"
        )
    return grpc.insecure_channel(address, options=options)


def write_self_signed(out_dir: Path, hosts: list[str], days: int = 365) -> tuple[Path, Path]:
    """A self-signed EC P-256 certificate for hosts, as out_dir/cert.pem and out_dir/key.pem (0600).

    P-256, not Ed25519: gRPC's BoringSSL client offers no Ed25519 signature scheme, so an
    Ed25519 certificate fails every handshake (NO_COMMON_SIGNATURE_ALGORITHMS).
    Existing files are refused, not overwritten: workers may have pinned that certificate.
    """
    if not hosts:
        raise TransportError("name at least one host name or IP address the workers will dial")
    cert_path, key_path = out_dir / "cert.pem", out_dir / "key.pem"
    for path in (cert_path, key_path):
        if path.exists():
            raise TransportError(f"{path} exists: workers may have pinned it; remove it or choose another directory")
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.IPAddress(ip) if (ip := _ip(h)) else x509.DNSName(h) for h in hosts]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))  # a worker's clock a little behind still accepts it
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with os.fdopen(os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle:
        handle.write(key_pem)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path
