"""Token shards and the manifest that names them.

A shard is an immutable flat file of little-endian token ids (no header, so any
tool can read it as a raw array). The manifest records each shard's sha256, token
count and provenance (language, source, licence, dates of its documents), and each
source's mixture weight; its root hash names the corpus in a run's genesis. A shard
is verified against the manifest before training on it.

Each shard also lists the sha256 of its consecutive ``chunk_bytes``-byte chunks, under
the root hash, so a worker that fetches only the byte ranges its leases need (from
the coordinator or a ``data_url``) can verify each chunk as it arrives.

A held-out split (``Manifest.heldout``) lists shards in the same format that are never
leased: models are evaluated on them (model/evaluate.py). Each shard records the UTF-8
bytes of the text its tokens encode (``text_bytes``), so losses convert to bits per byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

# Explicit little-endian dtypes: shards move between machines.
_NUMPY_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_FIX_HINT = "re-run `essaim data prepare` or restore the file"
MANIFEST_FILE = "manifest.json"  # in the prepared directory, beside the shards
# 1 MiB: a chunk hash per 1 MiB costs 0.006 % of the shard in the manifest, and a worker
# fetches at most one chunk it does not need at each end of a lease's range.
CHUNK_BYTES = 1 << 20


class ShardIntegrityError(Exception):
    """A shard file is missing or does not match its manifest entry."""


def token_dtype(vocab_size: int) -> str:
    """The smallest shard dtype that holds every token id of the vocabulary."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def numpy_dtype(dtype: str) -> np.dtype:
    try:
        return _NUMPY_DTYPES[dtype]
    except KeyError:
        raise ValueError(
            f"unknown shard dtype {dtype!r}: use one of {', '.join(_NUMPY_DTYPES)}"
        ) from None


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in chunks so large shards need little memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    """Write via a temp file in the same directory then ``os.replace``: readers see
    the old file or the new one, never half of one. ``durable``: fsync before the
    rename, so a crash cannot leave an empty file under the name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_shard(tokens: np.ndarray, path: Path, dtype: str) -> str:
    """Write ``tokens`` as a shard file and return its sha256."""
    np_dtype = numpy_dtype(dtype)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"a shard holds a flat array of token ids, got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(np_dtype).max):
        raise ValueError(
            f"token ids span [{tokens.min()}, {tokens.max()}], which does not fit {dtype}: "
            "use token_dtype(vocab_size) to choose the dtype"
        )
    data = tokens.astype(np_dtype).tobytes()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def chunk_hashes(path: Path, chunk_bytes: int) -> tuple[str, ...]:
    """The sha256 of each consecutive ``chunk_bytes`` of a file (the last chunk may be shorter)."""
    hashes = []
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            hashes.append(hashlib.sha256(chunk).hexdigest())
    return tuple(hashes)


def verify_shard(path: Path, expected_sha256: str, expected_tokens: int, dtype: str) -> None:
    """Raise ``ShardIntegrityError`` unless the file has the expected size and sha256."""
    path = Path(path)
    if not path.is_file():
        raise ShardIntegrityError(f"shard file {path} is missing: {_FIX_HINT}")
    expected_size = expected_tokens * numpy_dtype(dtype).itemsize
    size = path.stat().st_size
    if size != expected_size:
        raise ShardIntegrityError(
            f"shard file {path} has {size} bytes, expected {expected_size} "
            f"({expected_tokens} {dtype} tokens): it is truncated or replaced; {_FIX_HINT}"
        )
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise ShardIntegrityError(
            f"shard file {path} is corrupted: sha256 {actual}, expected {expected_sha256}; "
            f"{_FIX_HINT}"
        )


def read_tokens(path: Path, dtype: str, start: int, end: int) -> np.ndarray:
    """Tokens ``[start, end)`` of a shard as int64 (the dtype torch embeddings take)."""
    np_dtype = numpy_dtype(dtype)
    n_tokens = Path(path).stat().st_size // np_dtype.itemsize
    if not 0 <= start <= end <= n_tokens:
        raise ValueError(
            f"token range [{start}, {end}) is outside shard {path}, which holds {n_tokens} tokens"
        )
    with open(path, "rb") as f:
        f.seek(start * np_dtype.itemsize)
        tokens = np.fromfile(f, dtype=np_dtype, count=end - start)
    return tokens.astype(np.int64)


@dataclass(frozen=True)
class ShardInfo:
    """One shard's manifest entry. ``file`` is relative to the manifest's directory."""

    shard_id: str
    file: str
    sha256: str
    tokens: int
    dtype: str
    language: str
    source: str
    licence: str
    date_from: str  # ISO dates of the oldest and newest document with tokens in the shard
    date_to: str
    chunk_sha256: tuple[str, ...] = ()  # of each Manifest.chunk_bytes of the file; () in manifests before chunks
    # UTF-8 bytes of the text its tokens stand for (document ends count none); 0 in manifests before it.
    text_bytes: int = 0

    @property
    def size_bytes(self) -> int:
        return self.tokens * numpy_dtype(self.dtype).itemsize


@dataclass(frozen=True)
class SourceInfo:
    """A source as the coordinator mixes it: ``weight`` sets its share of trained tokens."""

    name: str
    language: str
    licence: str
    weight: float
    date_from: str
    date_to: str


@dataclass
class Manifest:
    """The catalog of a prepared corpus: tokenizer identity, sources, every training shard and the held-out ones."""

    vocab_size: int
    tokenizer_sha256: str
    sources: list[SourceInfo]
    shards: list[ShardInfo]  # what the coordinator leases
    chunk_bytes: int = CHUNK_BYTES
    heldout: list[ShardInfo] = field(default_factory=list)  # never leased: evaluation only

    def root_hash(self) -> str:
        """sha256 naming the corpus: any change to a shard, its chunks, a source or the tokenizer changes it.

        The held-out shards are covered too: a run is defined by what it is evaluated on as well.
        A manifest written before chunk hashes, text bytes or held-out shards existed hashes as it
        did then (no such fields).
        """
        every = [*self.shards, *self.heldout]
        chunked = any(s.chunk_sha256 for s in every)
        entries = [_hashed_entry(s) for s in sorted(self.shards, key=lambda s: s.shard_id)]
        sources = [asdict(s) for s in sorted(self.sources, key=lambda s: s.name)]
        named: dict[str, object] = {"tokenizer_sha256": self.tokenizer_sha256, "sources": sources, "shards": entries}
        if self.heldout:
            named["heldout"] = [_hashed_entry(s) for s in sorted(self.heldout, key=lambda s: s.shard_id)]
        if chunked:
            named["chunk_bytes"] = self.chunk_bytes
        canonical = json.dumps(
            named,
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def shard(self, shard_id: str) -> ShardInfo | None:
        """A training shard (a held-out one is not: it is never leased)."""
        return next((s for s in self.shards if s.shard_id == shard_id), None)

    def heldout_shard(self, shard_id: str) -> ShardInfo | None:
        return next((s for s in self.heldout if s.shard_id == shard_id), None)

    def save(self, path: Path) -> None:
        document = {
            "vocab_size": self.vocab_size,
            "tokenizer_sha256": self.tokenizer_sha256,
            "chunk_bytes": self.chunk_bytes,
            # For people comparing with a run's genesis; checked again on load.
            "root_hash": self.root_hash(),
            "sources": [asdict(s) for s in self.sources],
            "shards": [asdict(s) for s in self.shards],
        }
        if self.heldout:
            document["heldout"] = [asdict(s) for s in self.heldout]
        text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
        atomic_write_bytes(path, text.encode("utf-8"))

    @classmethod
    def load(cls, path: Path) -> "Manifest":
        path = Path(path)
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"no corpus manifest at {path}: re-run `essaim data prepare` to write it") from None
        return cls.parse(text, str(path))

    @classmethod
    def parse(cls, text: bytes, where: str) -> "Manifest":
        """A manifest from its JSON bytes (a file, or a download); ``where`` names it in errors."""
        path = where
        hint = "re-run `essaim data prepare` to write it"
        try:
            document = json.loads(text.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"corpus manifest {path} is not valid JSON ({e}): {hint}") from None
        try:
            shards = [_entry(ShardInfo, entry) for entry in document["shards"]]
            heldout = [_entry(ShardInfo, entry) for entry in document.get("heldout", [])]
            for shard in [*shards, *heldout]:
                numpy_dtype(shard.dtype)
            manifest = cls(
                vocab_size=int(document["vocab_size"]),
                tokenizer_sha256=str(document["tokenizer_sha256"]),
                sources=[_entry(SourceInfo, entry) for entry in document["sources"]],
                shards=shards,
                chunk_bytes=int(document.get("chunk_bytes", CHUNK_BYTES)),
                heldout=heldout,
            )
            for shard in [*shards, *heldout]:
                expected_chunks = -(-shard.size_bytes // manifest.chunk_bytes)
                if shard.chunk_sha256 and len(shard.chunk_sha256) != expected_chunks:
                    raise ValueError(f"shard {shard.shard_id} lists {len(shard.chunk_sha256)} chunk hashes, "
                                     f"expected {expected_chunks}")
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"corpus manifest {path} is malformed ({type(e).__name__}: {e}): {hint}"
            ) from None
        every = [*shards, *heldout]
        ids = [s.shard_id for s in every]
        if len(set(ids)) != len(ids):
            raise ValueError(f"corpus manifest {path} lists a shard id twice: {hint}")
        unknown = sorted({s.source for s in every} - {s.name for s in manifest.sources})
        if unknown:
            raise ValueError(f"corpus manifest {path}: shards of source {unknown[0]!r}, which it does not list: {hint}")
        stored = document.get("root_hash")
        if stored is not None and stored != manifest.root_hash():
            raise ValueError(
                f"corpus manifest {path} was edited after it was written: its entries hash to "
                f"{manifest.root_hash()}, not the recorded root_hash {stored}; {hint}"
            )
        return manifest


def _hashed_entry(shard: ShardInfo) -> dict:  # type: ignore[type-arg]
    entry = asdict(shard)
    if not shard.chunk_sha256:
        del entry["chunk_sha256"]  # as manifests hashed before chunks existed
    else:
        entry["chunk_sha256"] = list(shard.chunk_sha256)
    if not shard.text_bytes:
        del entry["text_bytes"]  # as manifests hashed before text bytes were counted
    return entry


def _entry(kind: type, entry: dict):  # type: ignore[no-untyped-def]
    expected = {f.name for f in fields(kind)}
    required = {f.name for f in fields(kind) if f.default is MISSING}
    if not required <= set(entry) <= expected:
        raise ValueError(f"{kind.__name__} entry has fields {sorted(entry)}, expected {sorted(expected)}")
    if "chunk_sha256" in entry:
        entry = {**entry, "chunk_sha256": tuple(entry["chunk_sha256"])}
    return kind(**entry)
