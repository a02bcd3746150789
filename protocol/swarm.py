"""Starting a hivemind DHT peer on a chosen address, with its sockets in a private directory.

A peer binds one address (``host``: an interface, or 0.0.0.0) and announces another
(``announce``: what other machines dial, e.g. a public IP behind port forwarding), so
the port must be fixed when announcing. hivemind puts p2pd's unix sockets in /tmp and
leaves some behind; pointing them at a per-process directory that the owner removes on
exit leaves nothing behind. With a credential check, the peer stores and accepts only
records of credentialed peers (protocol/dht_records.py).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from protocol.credentials import CredentialCheck

if TYPE_CHECKING:
    import hivemind


class SwarmError(RuntimeError):
    """The hivemind peer could not start or could not reach the swarm; the message says what to check."""


def multiaddr(host: str, port: int) -> str:
    """/ip4/..., /ip6/... or /dns/... for a host and TCP port."""
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        return f"/dns/{host}/tcp/{port}"
    return f"/ip{version}/{host}/tcp/{port}"


def free_port(host: str, port: int = 0) -> int:
    """``port`` (0: any) if it is free on ``host`` now, else SwarmError.

    p2pd binds with SO_REUSEPORT, so a second peer on a busy port would start and share it
    silently; a plain bind first turns that into an error.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR (as p2pd has): connections of a closed listener in TIME_WAIT do not count, a live one does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise SwarmError(f"cannot listen on {host}:{port} for the hivemind peer ({error.strerror}): "
                             "another process uses the port; choose another --dht-port or stop it") from None
        return probe.getsockname()[1]


class Swarm:
    """A DHT peer plus the directory its sockets live in; `close()` removes both."""

    def __init__(self, host: str, initial_peers: Sequence[str] = (), client_mode: bool = False, port: int = 0,
                 announce: str = "", credentials: CredentialCheck | None = None, dht_prefix: str = "") -> None:
        os.environ.setdefault("HIVEMIND_LOGLEVEL", "WARNING")
        os.environ.setdefault("GOLOG_LOG_LEVEL", "error")
        import hivemind
        from hivemind.p2p.p2p_daemon import P2P

        from protocol.dht_records import CredentialRecords

        if port or announce:  # a port to announce must be fixed
            port = free_port(host, port)
        # Short path: unix socket paths are limited to 108 bytes. A supervisor may choose the
        # parent (ESSAIM_SOCKET_DIR) to clean up after a peer that was killed.
        parent = os.environ.get("ESSAIM_SOCKET_DIR", "/tmp")
        self.socket_dir = Path(tempfile.mkdtemp(prefix="essaim-p2p-", dir=parent))
        P2P._UNIX_SOCKET_PREFIX = f"/unix{self.socket_dir}/hivemind-"
        self.client_mode = client_mode
        # Created before the DHT process forks: the credential it holds is shared with it.
        self.records = CredentialRecords(credentials, dht_prefix) if credentials is not None else None
        try:
            self.dht: hivemind.DHT = hivemind.DHT(
                host_maddrs=[multiaddr(host, port)],
                announce_maddrs=[multiaddr(announce, port)] if announce else None,
                initial_peers=list(initial_peers),
                client_mode=client_mode,
                record_validators=[self.records] if self.records is not None else [],
                start=True,
            )
        except Exception as error:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
            raise SwarmError(_why_not_started(error, host, port, initial_peers)) from None

    def hold_credential(self, credential: bytes) -> None:
        """What this peer's DHT records carry from now on: its newest round credential."""
        if self.records is not None:
            self.records.hold(credential)

    def visible_addresses(self) -> list[str]:
        return [str(address) for address in self.dht.get_visible_maddrs()]

    def close(self) -> None:
        try:
            self.dht.shutdown()
        finally:
            shutil.rmtree(self.socket_dir, ignore_errors=True)


def _why_not_started(error: Exception, host: str, port: int, initial_peers: Sequence[str]) -> str:
    text = str(error)
    if "bootstrap" in text or ("connect" in text.lower() and initial_peers):
        return (f"the swarm's DHT peers did not answer (tried {', '.join(initial_peers)}): check that this machine "
                "can open TCP connections to that address and port (the coordinator announces it: its --announce "
                "and --dht-port)")
    where = f"{host}:{port}" if port else host
    return (f"cannot start the hivemind peer on {where} ({text.strip() or type(error).__name__}): is the port in use, "
            "or the address not one of this machine's?")
