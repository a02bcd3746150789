"""Starting a hivemind DHT peer on a chosen host, with its sockets in a private directory.

hivemind puts p2pd's unix sockets in /tmp and leaves some behind; pointing them
at a per-process directory that the owner removes on exit leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import hivemind


class Swarm:
    """A DHT peer plus the directory its sockets live in; `close()` removes both."""

    def __init__(self, host: str, initial_peers: Sequence[str] = (), client_mode: bool = False) -> None:
        os.environ.setdefault("HIVEMIND_LOGLEVEL", "WARNING")
        os.environ.setdefault("GOLOG_LOG_LEVEL", "error")
        import hivemind
        from hivemind.p2p.p2p_daemon import P2P

        # Short path: unix socket paths are limited to 108 bytes. A supervisor may choose the
        # parent (ESSAIM_SOCKET_DIR) to clean up after a peer that was killed.
        parent = os.environ.get("ESSAIM_SOCKET_DIR", "/tmp")
        self.socket_dir = Path(tempfile.mkdtemp(prefix="essaim-p2p-", dir=parent))
        P2P._UNIX_SOCKET_PREFIX = f"/unix{self.socket_dir}/hivemind-"
        self.dht: hivemind.DHT = hivemind.DHT(
            host_maddrs=[f"/ip4/{host}/tcp/0"],
            initial_peers=list(initial_peers),
            client_mode=client_mode,
            start=True,
        )

    def visible_addresses(self) -> list[str]:
        return [str(address) for address in self.dht.get_visible_maddrs()]

    def close(self) -> None:
        try:
            self.dht.shutdown()
        finally:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
