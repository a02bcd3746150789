"""The corpus files a registered worker may read from the coordinator: manifest.json and the shards it lists.

Workers on other machines fetch the byte ranges their leases need over the same gRPC
connection as everything else (ReadCorpusFile, a server stream): one port to open, the
same TLS and the same signed requests, and no second server to run. Nothing else of
the data directory (the database, the tokenizer's sources) can be named.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator

from model.shards import MANIFEST_FILE, Manifest

PIECE_BYTES = 256 * 1024  # one message of the stream: small enough to keep the link busy, big enough to be cheap
# A download holds a server thread for as long as it lasts: past this many at once the next is
# told to come back (RESOURCE_EXHAUSTED), so heartbeats and reports always find a thread.
MAX_CONCURRENT_READS = 16


class CorpusFileError(Exception):
    """A read that must be refused; ``kind`` is "not_found", "out_of_range" or "busy"."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class CorpusFiles:
    def __init__(self, data_dir: Path, manifest: Manifest, max_concurrent_reads: int = MAX_CONCURRENT_READS) -> None:
        shards = [*manifest.shards, *manifest.heldout]  # held-out shards too: workers evaluate on them
        self._paths = {MANIFEST_FILE: data_dir / MANIFEST_FILE} | {s.file: data_dir / s.file for s in shards}
        self._slots = threading.BoundedSemaphore(max_concurrent_reads)
        self._max_concurrent_reads = max_concurrent_reads

    def read(self, file: str, offset: int, length: int) -> Iterator[bytes]:
        """Bytes [offset, offset + length) of ``file`` (length 0: to its end), in pieces of at most PIECE_BYTES."""
        path = self._paths.get(file)
        if path is None:
            raise CorpusFileError(f"{file!r} is not a file of this run's corpus: ask for {MANIFEST_FILE} "
                                  "or a shard file it lists", "not_found")
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise CorpusFileError(f"the coordinator has lost {file}: its host must restore the prepared corpus "
                                  "(`essaim audit verify` names what is missing)", "not_found") from None
        end = size if length == 0 else offset + length
        if offset < 0 or length < 0 or end > size:
            raise CorpusFileError(f"bytes [{offset}, {end}) are outside {file}, which has {size} bytes", "out_of_range")
        if not self._slots.acquire(blocking=False):
            raise CorpusFileError(f"the coordinator is serving {self._max_concurrent_reads} downloads already: "
                                  "retry in a few seconds", "busy")
        return self._pieces(path, offset, end)

    def _pieces(self, path: Path, offset: int, end: int) -> Iterator[bytes]:
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                while offset < end:
                    piece = f.read(min(PIECE_BYTES, end - offset))
                    if not piece:
                        return  # the file shrank under us: the worker sees a short read and says so
                    offset += len(piece)
                    yield piece
        finally:  # also when the worker hangs up mid-stream: gRPC closes the generator
            self._slots.release()
