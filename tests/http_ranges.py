"""A real HTTP file server for tests of `data_url`: Range support on or off, and a connection cut on demand."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator


@dataclass
class ServedFiles:
    url: str
    ranges: list[tuple[str, str]] = field(default_factory=list)  # (path, Range header or "") of each GET
    cut: tuple[int, int] = (0, 0)  # (n, k): the n-th ranged GET (1-based) is cut after k body bytes


def _handler(root: Path, served: ServedFiles, honour_ranges: bool) -> type[SimpleHTTPRequestHandler]:
    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            wanted = self.headers.get("Range", "")
            served.ranges.append((self.path, wanted))
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted)
            path = root / self.path.lstrip("/")
            if not honour_ranges or not match or not path.is_file():
                return super().do_GET()
            data = path.read_bytes()
            start = int(match.group(1))
            end = min(int(match.group(2)) + 1 if match.group(2) else len(data), len(data))
            body = data[start:end]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            ranged = sum(1 for _, header in served.ranges if header)
            if ranged == served.cut[0]:
                body = body[: served.cut[1]]
                self.wfile.write(body)
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)  # the rest never comes: a dropped link
                return
            self.wfile.write(body)

    return Handler


def serve_files(root: Path, honour_ranges: bool = True) -> Iterator[ServedFiles]:
    """Serve ``root`` on 127.0.0.1 until the generator is closed (use as a fixture body)."""
    served = ServedFiles(url="")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(root, served, honour_ranges))
    served.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


if __name__ == "__main__":  # python tests/http_ranges.py DIR HOST PORT: serve until killed (benchmarks)
    import sys

    directory, host, port = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    ThreadingHTTPServer((host, port), _handler(directory, ServedFiles(url=""), honour_ranges=True)).serve_forever()
