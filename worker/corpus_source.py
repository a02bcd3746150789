"""Where a worker fetches the corpus bytes it lacks: the coordinator (default) or the run's ``data_url``.

Both read byte ranges of the prepared directory's files (manifest.json and shards) and
stream them in pieces, so a worker fetches only what its leases need. Neither is
trusted: every byte is checked against the manifest's hashes before training
(worker/shards.py), and the manifest against the run's corpus root hash.
"""

from __future__ import annotations

import time
from typing import Iterator, Protocol

import grpc

from worker.client import CoordinatorClient

BUSY_RETRY_SECONDS = (2.0, 4.0, 8.0, 16.0, 30.0)  # a coordinator serving its most downloads: wait, then ask again
URL_BLOCK_BYTES = 4 << 20  # one Range request per block: a cut download resumes from the last whole block


class FetchFailed(Exception):
    """A fetch that did not deliver: the message names the source, the file and what to do."""


class CorpusSource(Protocol):
    def describe(self) -> str: ...

    def read(self, file: str, start: int, end: int | None) -> Iterator[bytes]:
        """Bytes [start, end) of a file of the prepared corpus (end None: to its end), in order."""
        ...


class CoordinatorSource:
    """ReadCorpusFile on the coordinator: the same connection, TLS and signatures as every other call."""

    def __init__(self, client: CoordinatorClient) -> None:
        self._client = client

    def describe(self) -> str:
        return f"the coordinator at {self._client.address}"

    def read(self, file: str, start: int, end: int | None) -> Iterator[bytes]:
        for wait in (*BUSY_RETRY_SECONDS, None):
            received = 0
            try:
                for piece in self._client.read_corpus_file(file, start, 0 if end is None else end - start):
                    received += len(piece.data)
                    yield piece.data
                return
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and wait is not None and not received:
                    time.sleep(wait)  # the coordinator turned the download away before sending anything
                    continue
                raise FetchFailed(f"reading {file} from {self.describe()} failed ({error.code().name}: "
                                  f"{error.details()})") from None


class UrlSource:
    """Any fsspec URL of the prepared directory: https:// (with Range support), s3://, gs://, file://."""

    def __init__(self, url: str, block_bytes: int = URL_BLOCK_BYTES) -> None:
        import fsspec

        self.url = url.rstrip("/")
        self.block_bytes = block_bytes
        try:
            self._fs, self._root = fsspec.core.url_to_fs(self.url)
        except (ImportError, ValueError) as error:
            raise FetchFailed(f"data_url {url!r} cannot be read here ({error}): install the fsspec "
                              "backend for its scheme (e.g. s3fs for s3://)") from None

    def describe(self) -> str:
        return f"data_url {self.url}"

    def read(self, file: str, start: int, end: int | None) -> Iterator[bytes]:
        path = f"{self._root}/{file}"
        try:
            with self._fs.open(path, "rb", block_size=self.block_bytes, cache_type="none") as f:
                f.seek(start)
                remaining = None if end is None else end - start
                while remaining is None or remaining > 0:
                    piece = f.read(self.block_bytes if remaining is None else min(self.block_bytes, remaining))
                    if not piece:
                        return
                    if remaining is not None:
                        remaining -= len(piece)
                    yield piece
        except FileNotFoundError:
            raise FetchFailed(f"{self.url}/{file} does not exist (HTTP 404 or no such object): the data_url must "
                              "serve the prepared directory as `essaim data prepare` wrote it") from None
        except ValueError as error:  # fsspec's HTTP file: the server ignored a Range request
            raise FetchFailed(f"{self.url}/{file}: {error}; serve the files with a server that honours "
                              "HTTP Range requests (any static file server, an object store)") from None
        except Exception as error:  # the backend's own errors (aiohttp, botocore...): the source is the network
            raise FetchFailed(f"reading {self.url}/{file} failed ({type(error).__name__}: {error})") from None
