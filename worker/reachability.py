"""Can other peers open a connection to this worker? Asked of the coordinator before the hivemind peer starts.

The worker listens on the port its peer will use and asks the coordinator to dial it
back (CheckReachable); the listener answers with a random token, so a NAT or another
service answering on that port does not count. A worker nobody can reach averages in
hivemind's client mode: it opens every connection itself.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass

from worker.client import CoordinatorClient, CoordinatorRefused, CoordinatorUnreachable

TOKEN_BYTES = 16


@dataclass(frozen=True)
class Reachability:
    reachable: bool
    seen_host: str  # this worker's address as the coordinator sees it ("" when unknown)
    error: str


class ReachabilityCheck:
    def __init__(self, client: CoordinatorClient, host: str, port: int) -> None:
        self.client, self.host, self.port = client, host, port
        self.token = os.urandom(TOKEN_BYTES)

    def run(self) -> Reachability:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as listener:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the hivemind peer binds it next
            listener.bind((self.host, self.port))
            listener.listen(4)
            listener.settimeout(0.2)
            stop = threading.Event()
            answering = threading.Thread(target=self._answer, args=(listener, stop), daemon=True)
            answering.start()
            try:
                reply = self.client.check_reachable(self.port, self.token)
            except (CoordinatorRefused, CoordinatorUnreachable) as error:
                return Reachability(False, "", f"the coordinator could not check ({error})")
            finally:
                stop.set()
                answering.join()
        return Reachability(reply.reachable, reply.seen_host, reply.error)

    def _answer(self, listener: socket.socket, stop: threading.Event) -> None:
        """Send the token to whoever connects, until the check is over."""
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            with connection:
                try:
                    connection.sendall(self.token)
                    connection.settimeout(3.0)
                    connection.recv(1)  # the dialler closes first, so the TIME_WAIT is usually on its side
                except OSError:
                    pass
