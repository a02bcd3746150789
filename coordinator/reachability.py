"""Dialling a worker back: can peers open a connection to the port its hivemind peer will listen on?

The coordinator dials the address the worker's request came from (what a peer on the
internet would see, a NAT's public address included), never an address the worker
names, so it cannot be used to probe other machines. The worker's probe listener
answers with a token of its own choosing: a connection that reaches anyone else (a
NAT's own port, another service) does not count.
"""

from __future__ import annotations

import ipaddress
import socket

DIAL_SECONDS = 3.0


def peer_host(grpc_peer: str) -> str:
    """The host of a gRPC peer string: "ipv4:10.0.0.2:5432" -> "10.0.0.2", "ipv6:[::1]:5432" -> "::1"."""
    kind, _, rest = grpc_peer.partition(":")
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    raise ValueError(f"cannot dial back a {kind or 'unknown'} peer ({grpc_peer})")


def dial_back(host: str, port: int, token: bytes, timeout: float = DIAL_SECONDS) -> str:
    """'' when ``host:port`` answers with ``token``; else what went wrong."""
    if not 0 < port < 65536:
        return f"port {port} is not a TCP port"
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.settimeout(timeout)
            probe.connect((host, port))
            received = b""
            while len(received) < len(token):
                piece = probe.recv(len(token) - len(received))
                if not piece:
                    break
                received += piece
    except OSError as error:
        return f"{host}:{port} cannot be reached from the coordinator ({error})"
    if received != token:
        return f"something else answers at {host}:{port} (a NAT or another service), not this worker"
    return ""
