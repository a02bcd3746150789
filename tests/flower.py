"""A real federated fine-tuning network for tests: SuperLink, sites (SuperNodes) behind a recording relay.

Sites reach the SuperLink through a TCP relay on 127.0.0.1 that keeps every
byte it forwards, so a test can search everything the SuperLink received.
Every process is started in its own session and stopped by process group.
"""

from __future__ import annotations

import socket
import subprocess
import threading
from pathlib import Path

from essaim.flower import start_site, start_superlink, wait_listening
from essaim.processes import terminate_group
from support import free_port


class RecordingRelay:
    """Forwards 127.0.0.1:port to a target and records both directions."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.upstream = bytearray()    # what clients sent to the target
        self.downstream = bytearray()  # what the target sent back
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                target = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, target, self.upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(target, client, self.downstream), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, record: bytearray) -> None:
        try:
            while chunk := source.recv(65536):
                with self._lock:
                    record.extend(chunk)
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed = True
        self._server.close()


class FinetuneNetwork:
    """A SuperLink and its sites, each process's log in WORKDIR/NAME.log; sites connect through the relay."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.processes["superlink"] = start_superlink(workdir / "superlink", self.port)
        wait_listening(self.port, self.processes["superlink"], 30)
        self.relay = RecordingRelay(self.port)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def add_site(self, name: str, data: Path, checkpoint: Path, *options: str) -> None:
        """options: more `essaim finetune site` options, such as a floor (--require-secagg, --max-epsilon E)."""
        self.processes[name] = start_site(f"127.0.0.1:{self.relay.port}", name, data, checkpoint, self.workdir / name,
                                          *options)

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def stop(self, name: str) -> None:
        terminate_group(self.processes[name])

    def close(self) -> None:
        for process in self.processes.values():
            terminate_group(process)
        self.relay.close()
