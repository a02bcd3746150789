"""A worker's leased tokens: read from a full local copy of the corpus, or fetched in verified chunks and cached.

Nothing is trained from bytes that were not checked: a local shard file against its
sha256 (once per process), a fetched or cached chunk against the manifest's chunk hash
(each time it is read), and the manifest against the run's corpus root hash.

The cache keeps whole chunks under ``DATA/chunks/<shard sha256>/<index>`` and a download
in progress as ``<index>.part``: a cut download resumes from the byte it reached. Past
``cache_bytes`` the least recently read chunks are evicted (never the ones being read).

``prefetch`` fetches a lease's bytes in the background: a round's leases download side by
side, so one request's round trip does not leave the link idle (fetches of one shard take
turns, since neighbouring leases share a chunk).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import threading
from collections import OrderedDict, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from model.shards import (
    MANIFEST_FILE,
    Manifest,
    ShardInfo,
    atomic_write_bytes,
    numpy_dtype,
    read_tokens,
    verify_shard,
)
from protocol import essaim_pb2 as pb
from worker.client import CoordinatorClient
from worker.corpus_source import CoordinatorSource, CorpusSource, FetchFailed, UrlSource

log = logging.getLogger("essaim.worker.shards")

FETCH_ATTEMPTS = 2  # a corrupted, cut or truncated download is fetched once more, then refused
FETCH_THREADS = 4  # leases downloading at once (a round's leases_per_round, by default)


class ShardUnavailable(Exception):
    """A lease's bytes could not be had (fetch failed twice, corrupted twice, disk full, cache too small).

    The worker releases the lease (its tokens go back to the pool at once) and says why.
    """


def check_file_name(file: str) -> str:
    """A shard file name from the coordinator or a manifest: a plain name that stays inside the data directory."""
    if not file or file in (".", "..") or PurePosixPath(file).name != file or "\\" in file:
        raise ShardUnavailable(f"shard file name {file!r} is not a plain file name: refusing to read or write "
                               "outside the data directory (is the coordinator or data_url trustworthy?)")
    return file


class ShardStore:
    """Leased token ranges, from ``data_dir``'s full shard files when present, else fetched from ``source``."""

    def __init__(self, data_dir: Path, manifest: Manifest | None = None, source: CorpusSource | None = None,
                 cache_bytes: int = 0) -> None:
        self.data_dir = Path(data_dir)
        self.manifest = manifest
        self.source = source
        self.cache = ChunkCache(self.data_dir / "chunks", cache_bytes)
        self._verified: set[tuple[str, str]] = set()  # full local files hashed by this process
        self._pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="shard-fetch")
        self._shard_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._closed = threading.Event()

    def prefetch(self, lease: pb.Lease) -> Future[torch.Tensor]:
        """``tokens(lease)`` in the background; the future raises what it would."""
        return self._pool.submit(self.tokens, lease)

    def close(self) -> None:
        """Stop downloads under way (at their next piece) and those not yet started."""
        self._closed.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def tokens(self, lease: pb.Lease, heldout: bool = False) -> torch.Tensor:
        """Tokens [start, end) of the lease's shard as int64, from verified bytes only.

        ``heldout``: the range is of a held-out shard, read to evaluate (worker/evaluation.py), never leased.
        """
        shard = self._manifest_entry(lease, heldout)
        if not 0 <= lease.start <= lease.end <= lease.shard_tokens:
            raise ShardUnavailable(f"lease {lease.lease_id}: tokens [{lease.start}, {lease.end}) are outside shard "
                                   f"{lease.shard_id}, which holds {lease.shard_tokens}")
        path = self.data_dir / check_file_name(lease.shard_file)
        if not path.is_file() and shard is not None and not shard.chunk_sha256:
            raise ShardUnavailable(f"shard {shard.shard_id} is not in {self.data_dir}, and the run's manifest has no "
                                   "chunk hashes to check a download with: the run's host must prepare the corpus again "
                                   "(`essaim data prepare`), or copy the shards into --data")
        if path.is_file() or self.source is None or shard is None:
            key = (str(path), lease.shard_sha256)
            if key not in self._verified:
                verify_shard(path, lease.shard_sha256, lease.shard_tokens, lease.dtype)  # ShardIntegrityError
                self._verified.add(key)
            return torch.from_numpy(read_tokens(path, lease.dtype, lease.start, lease.end))
        dtype = numpy_dtype(shard.dtype)
        with self._shard_locks[shard.sha256]:
            data = self._fetched(shard, lease.start * dtype.itemsize, lease.end * dtype.itemsize)
        return torch.from_numpy(np.frombuffer(data, dtype=dtype).astype(np.int64))

    def _manifest_entry(self, lease: pb.Lease, heldout: bool = False) -> ShardInfo | None:
        """The manifest's entry for the lease's shard, which the lease must agree with: a training shard, or a
        held-out one when ``heldout`` (so a lease naming a held-out shard is refused)."""
        if self.manifest is None:
            return None
        shard = self.manifest.heldout_shard(lease.shard_id) if heldout else self.manifest.shard(lease.shard_id)
        if shard is None or (shard.file, shard.sha256, shard.tokens, shard.dtype) != (
                lease.shard_file, lease.shard_sha256, lease.shard_tokens, lease.dtype):
            raise ShardUnavailable(
                f"the coordinator leased shard {lease.shard_id!r} ({lease.shard_file}, sha256 {lease.shard_sha256[:16]}), "
                f"which the run's manifest (corpus {self.manifest.root_hash()[:16]}) does not list as such")
        return shard

    def _fetched(self, shard: ShardInfo, start: int, end: int) -> bytes:
        """Bytes [start, end) of a shard, from cached or freshly fetched chunks, each checked against its hash."""
        assert self.manifest is not None and self.source is not None
        size = self.manifest.chunk_bytes
        indices = range(start // size, (max(end, start + 1) - 1) // size + 1)
        pinned = {self.cache.path(shard, i) for i in indices}
        chunks = {i: data for i in indices if (data := self.cache.read(shard, i)) is not None}
        reasons: dict[int, str] = {}
        for _ in range(FETCH_ATTEMPTS):
            missing = [i for i in indices if i not in chunks]
            if not missing:
                break
            reasons = self._fetch(shard, missing, pinned, chunks)
        missing = [i for i in indices if i not in chunks]
        if missing:
            why = "; ".join(sorted(set(reasons.values()))) or "not delivered"
            which = f"chunk {missing[0]}" if len(missing) == 1 else f"chunks {missing[0]}..{missing[-1]}"
            raise ShardUnavailable(
                f"shard {shard.shard_id} ({shard.file}) {which} from "
                f"{self.source.describe()}: {why} (tried {FETCH_ATTEMPTS} times); nothing of it was trained. "
                "The run's host should check its corpus (`essaim audit verify`)")
        first = indices[0] * size
        return b"".join(chunks[i] for i in indices)[start - first : end - first]

    def _fetch(self, shard: ShardInfo, missing: list[int], pinned: set[Path], chunks: dict[int, bytes]) -> dict[int, str]:
        """Fetch runs of consecutive missing chunks, one streamed request per run; returns why chunks failed."""
        assert self.manifest is not None and self.source is not None
        reasons: dict[int, str] = {}
        for run in _consecutive(missing):
            writer = _ChunkWriter(self.cache, shard, self.manifest.chunk_bytes, run, pinned, chunks, reasons)
            try:
                for piece in self.source.read(shard.file, writer.next_byte(), writer.end_byte()):
                    if self._closed.is_set():
                        raise FetchFailed("the worker is stopping")
                    writer.write(piece)
            except FetchFailed as error:
                writer.cut(f"download cut: {error}")
            except OSError as error:
                writer.abandon()
                if error.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise ShardUnavailable(f"no space left in {self.data_dir} while caching shard {shard.shard_id}: "
                                           "free some space or lower --cache-bytes") from None
                raise ShardUnavailable(f"cannot cache shard {shard.shard_id} in {self.data_dir}: {error}") from None
            writer.cut("truncated: the source sent fewer bytes than the manifest lists")
        return reasons


class _ChunkWriter:
    """Writes one streamed run of chunks: each chunk to its .part file, checked and kept once complete."""

    def __init__(self, cache: ChunkCache, shard: ShardInfo, chunk_bytes: int, run: list[int], pinned: set[Path],
                 chunks: dict[int, bytes], reasons: dict[int, str]) -> None:
        self.cache, self.shard, self.chunk_bytes, self.pinned = cache, shard, chunk_bytes, pinned
        self.pending, self.chunks, self.reasons = list(run), chunks, reasons
        self.part = cache.part(shard, self.pending[0])  # bytes already there: the download resumes after them

    def next_byte(self) -> int:
        return self.pending[0] * self.chunk_bytes + len(self.part)

    def end_byte(self) -> int:
        return min((self.pending[-1] + 1) * self.chunk_bytes, self.shard.size_bytes)

    def _length(self, index: int) -> int:
        return min(self.chunk_bytes, self.shard.size_bytes - index * self.chunk_bytes)

    def write(self, piece: bytes) -> None:
        while piece and self.pending:
            index = self.pending[0]
            take = self._length(index) - len(self.part)
            self.part += piece[:take]
            piece = piece[take:]
            if len(self.part) == self._length(index):
                self._finish(index)
        if piece:
            raise FetchFailed(f"the source sent more bytes than {self.shard.file} holds")

    def _finish(self, index: int) -> None:
        self.pending.pop(0)
        data, self.part = self.part, b""
        if hashlib.sha256(data).hexdigest() != self.shard.chunk_sha256[index]:
            self.cache.drop_part(self.shard, index)
            self.reasons[index] = "the bytes received do not match the manifest's hash (corrupted at the source or in transit)"
            log.warning("shard %s chunk %d does not match its hash", self.shard.shard_id, index)
        else:
            self.cache.keep(self.shard, index, data, self.pinned)
            self.chunks[index] = data
            self.reasons.pop(index, None)
        if self.pending:
            self.part = self.cache.part(self.shard, self.pending[0])

    def cut(self, reason: str) -> None:
        """The stream ended early: keep what arrived of the current chunk, so the next attempt resumes there."""
        if self.pending and self.part:
            self.cache.save_part(self.shard, self.pending[0], self.part)
        for index in self.pending:
            self.reasons[index] = reason
        self.pending = []

    def abandon(self) -> None:
        if self.pending:
            self.cache.drop_part(self.shard, self.pending[0])
        self.pending = []


class ChunkCache:
    """Verified chunks on disk, least recently read evicted past ``cap_bytes`` (0: no cap)."""

    def __init__(self, root: Path, cap_bytes: int) -> None:
        self.root, self.cap_bytes = root, cap_bytes
        kept = sorted(root.glob("*/*.chunk"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
        self._lru: OrderedDict[Path, int] = OrderedDict((p, p.stat().st_size) for p in kept)
        self.bytes = sum(self._lru.values())
        self.evictions = 0
        self._lock = threading.Lock()  # fetches of different shards keep and evict side by side

    def path(self, shard: ShardInfo, index: int) -> Path:
        return self.root / shard.sha256 / f"{index:08d}.chunk"

    def read(self, shard: ShardInfo, index: int) -> bytes | None:
        """A kept chunk, checked against its hash again (a disk can rot); None if absent or damaged."""
        path = self.path(shard, index)
        with self._lock:
            if path not in self._lru:
                return None
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != shard.chunk_sha256[index]:
                log.warning("cached chunk %s is damaged: fetching it again", path)
                self._forget(path)
                return None
            os.utime(path)
            self._lru.move_to_end(path)
        return data

    def part(self, shard: ShardInfo, index: int) -> bytes:
        path = self.path(shard, index).with_suffix(".part")
        return path.read_bytes() if path.is_file() else b""

    def save_part(self, shard: ShardInfo, index: int, data: bytes) -> None:
        atomic_write_bytes(self.path(shard, index).with_suffix(".part"), data, durable=False)

    def drop_part(self, shard: ShardInfo, index: int) -> None:
        self.path(shard, index).with_suffix(".part").unlink(missing_ok=True)

    def keep(self, shard: ShardInfo, index: int, data: bytes, pinned: set[Path]) -> None:
        path = self.path(shard, index)
        with self._lock:
            self._make_room(len(data), pinned)
            # No fsync: a chunk is checked against its hash whenever it is read, and fetched again if damaged.
            atomic_write_bytes(path, data, durable=False)
            self._lru[path] = len(data)
            self.bytes += len(data)
        self.drop_part(shard, index)

    def _make_room(self, needed: int, pinned: set[Path]) -> None:
        if not self.cap_bytes:
            return
        for path in [p for p in self._lru if p not in pinned]:
            if self.bytes + needed <= self.cap_bytes:
                return
            self._forget(path)
            self.evictions += 1
        if self.bytes + needed > self.cap_bytes:
            raise ShardUnavailable(f"--cache-bytes {self.cap_bytes} cannot hold the chunks of one lease "
                                   f"({self.bytes + needed} bytes needed): raise it")

    def _forget(self, path: Path) -> None:
        self.bytes -= self._lru.pop(path, 0)
        path.unlink(missing_ok=True)


def open_store(config: pb.RunConfig, data_dir: Path, source: CorpusSource, cache_bytes: int) -> ShardStore:
    """The run's shards in ``data_dir``: its manifest read there or fetched, checked against the run's hashes."""
    if hashlib.sha256(config.tokenizer_json).hexdigest() != config.tokenizer_sha256:
        raise ShardUnavailable("the run config's tokenizer does not match its own tokenizer_sha256: "
                               "the coordinator is misconfigured or the reply was altered")
    local = data_dir / MANIFEST_FILE
    if local.is_file():
        manifest, where = Manifest.load(local), str(local)
    else:
        try:
            text = b"".join(source.read(MANIFEST_FILE, 0, None))
        except FetchFailed as error:
            raise ShardUnavailable(f"cannot fetch the run's manifest: {error}") from None
        where = f"the manifest from {source.describe()}"
        manifest = Manifest.parse(text, where)
        if manifest.root_hash() == config.corpus_root_hash:
            atomic_write_bytes(local, text)
    if manifest.root_hash() != config.corpus_root_hash:
        raise ShardUnavailable(
            f"{where} describes corpus {manifest.root_hash()[:16]}, but the run trains corpus "
            f"{config.corpus_root_hash[:16]}: " + ("use another --data directory for this run" if local.is_file()
                                                   else "the data_url serves another corpus"))
    if manifest.tokenizer_sha256 != config.tokenizer_sha256:
        raise ShardUnavailable(f"{where} was tokenized with tokenizer {manifest.tokenizer_sha256[:16]}, "
                               f"not the run's {config.tokenizer_sha256[:16]}")
    for shard in [*manifest.shards, *manifest.heldout]:
        check_file_name(shard.file)
    return ShardStore(data_dir, manifest, source, cache_bytes)


DEFAULT_DATA_ROOT = Path.home() / ".essaim" / "data"  # a run's cache: DEFAULT_DATA_ROOT / <run id>


def run_store(config: pb.RunConfig, data_dir: Path | None, client: CoordinatorClient,
              cache_bytes: int) -> tuple[ShardStore, Path, CorpusSource]:
    """The run's shards as a worker or a validator reads them, and where from.

    In `data_dir` if given, else the coordinator's own directory if this machine sees it, else a
    cache under DEFAULT_DATA_ROOT; missing bytes come from the run's data_url, else the coordinator.
    """
    data_dir = data_dir or shared_corpus_dir(config) or DEFAULT_DATA_ROOT / config.run_id
    source = UrlSource(config.data_url) if config.data_url else CoordinatorSource(client)
    return open_store(config, data_dir, source, cache_bytes), data_dir, source  # ShardUnavailable: refused here


def shared_corpus_dir(config: pb.RunConfig) -> Path | None:
    """The coordinator's own corpus directory, when this machine sees it (a shared file system on HPC)."""
    directory = Path(config.shard_dir) if config.shard_dir else None
    if directory is None or not (directory / MANIFEST_FILE).is_file():
        return None
    try:
        return directory if Manifest.load(directory / MANIFEST_FILE).root_hash() == config.corpus_root_hash else None
    except (OSError, ValueError):
        return None


def _consecutive(indices: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for index in indices:
        if runs and runs[-1][-1] + 1 == index:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs
