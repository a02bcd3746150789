"""Corpus preparation: text files with their provenance -> tokenizer + token shards.

The corpus config is a TOML file of sources, each with the language and licence of
its text, so that every shard (and later every checkpoint's model card) can say
what it was trained on:

    [[source]]
    name = "wiki-fr"                 # letters, digits, '.', '_', '-' (names shard files)
    language = "fr"
    licence = "CC-BY-SA-4.0"
    paths = ["wiki/fr/part1.txt", "wiki/fr/part2.txt"]   # relative to this file

Each text file (UTF-8) is one document: documents are tokenized one at a time and
each is followed by "</s>". Split a large collection into many files.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.shards import Manifest, ShardInfo, token_dtype, write_shard
from model.tokenizer import EOS_ID, tokenizer_sha256, train_tokenizer

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_REQUIRED = {
    "name": 'name = "wiki-fr"',
    "language": 'language = "fr" (or "en", "code", ...)',
    "licence": 'licence = "CC-BY-SA-4.0" (an SPDX identifier, or the terms in words)',
    "paths": 'paths = ["texts/part1.txt"] (relative to the config file)',
}


@dataclass
class CorpusSource:
    """Text files sharing one origin, language and licence."""

    name: str
    language: str
    licence: str
    paths: list[Path]


def load_corpus_config(path: Path) -> list[CorpusSource]:
    """Read and validate a corpus TOML; errors name the source and what to write."""
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no corpus config at {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"corpus config {path} is not valid TOML: {e}") from None
    entries = document.get("source")
    if not isinstance(entries, list) or not entries:
        raise ValueError(
            f"corpus config {path} has no [[source]] tables: add one per source, with "
            + ", ".join(_REQUIRED)
        )
    sources = [_parse_source(entry, i, path) for i, entry in enumerate(entries, start=1)]
    _check_unique_names(sources, where=f"corpus config {path}")
    return sources


def _parse_source(entry: dict, index: int, config: Path) -> CorpusSource:
    label = f"source #{index}" + (f" ({entry['name']!r})" if "name" in entry else "")
    where = f"corpus config {config}, {label}"
    unknown = sorted(set(entry) - set(_REQUIRED))
    if unknown:
        hint = " (the field is spelled 'licence')" if "license" in unknown else ""
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}{hint}")
    for field, example in _REQUIRED.items():
        value = entry.get(field)
        if value in (None, "", []):
            raise ValueError(f"{where} has no {field}: add {example}")
    if not all(isinstance(entry[f], str) for f in ("name", "language", "licence")):
        raise ValueError(f"{where}: name, language and licence must be strings")
    if not _NAME_RE.match(entry["name"]):
        raise ValueError(
            f"{where}: the name may hold only letters, digits, '.', '_' and '-' "
            "(it names the shard files)"
        )
    if not isinstance(entry["paths"], list) or not all(isinstance(p, str) for p in entry["paths"]):
        raise ValueError(f"{where}: paths must be a list of strings, e.g. {_REQUIRED['paths']}")
    paths = [config.parent / p for p in entry["paths"]]
    for p in paths:
        if not p.is_file():
            raise ValueError(f"{where}: text file {p} does not exist; fix the path or remove it")
    return CorpusSource(entry["name"], entry["language"], entry["licence"], paths)


def _check_unique_names(sources: list[CorpusSource], where: str) -> None:
    seen: set[str] = set()
    for source in sources:
        if source.name in seen:
            raise ValueError(f"{where}: two sources are named {source.name!r}; rename one")
        seen.add(source.name)


def _documents(source: CorpusSource) -> Iterator[str]:
    """The source's documents, one file at a time (empty files skipped)."""
    for path in source.paths:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"source {source.name!r}: {path} is not UTF-8 ({e}); convert it "
                "(e.g. `iconv -t UTF-8`) before preparing the corpus"
            ) from None
        if text:
            yield text


def prepare_corpus(
    sources: list[CorpusSource], out_dir: Path, vocab_size: int, shard_tokens: int
) -> Manifest:
    """Train a tokenizer on all sources, then write each source's tokens as shards.

    Writes ``out_dir/tokenizer/``, ``out_dir/<source>-<index>.bin`` and
    ``out_dir/manifest.json`` (written last, so its presence means the rest is there).
    A shard holds tokens of one source only, so its language and licence are exact;
    documents may continue from one shard of a source into the next. Files are read
    one at a time, twice (tokenizer training, then encoding), so the corpus never has
    to fit in memory.
    """
    if shard_tokens <= 0:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    if not sources:
        raise ValueError("no corpus sources given: describe at least one in the corpus config")
    _check_unique_names(sources, where="corpus sources")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer_dir = out_dir / "tokenizer"
    all_documents = (doc for source in sources for doc in _documents(source))
    tokenizer = train_tokenizer(all_documents, vocab_size, tokenizer_dir)
    encoder = tokenizer.backend_tokenizer  # the raw `tokenizers` object: no HF overhead
    dtype = token_dtype(vocab_size)

    shards: list[ShardInfo] = []
    for source in sources:
        writer = _SourceShardWriter(source, out_dir, dtype, shard_tokens)
        for document in _documents(source):
            ids = encoder.encode(document, add_special_tokens=False).ids
            ids.append(EOS_ID)
            writer.add(np.asarray(ids, dtype=np.int64))
        source_shards = writer.finish()
        if not source_shards:
            raise ValueError(f"source {source.name!r} has no text: its files are all empty")
        shards.extend(source_shards)

    manifest = Manifest(vocab_size, tokenizer_sha256(tokenizer_dir), shards)
    manifest.save(out_dir / "manifest.json")
    return manifest


class _SourceShardWriter:
    """Buffers one source's tokens and writes a shard each time ``shard_tokens`` are ready."""

    def __init__(self, source: CorpusSource, out_dir: Path, dtype: str, shard_tokens: int):
        self.source, self.out_dir, self.dtype = source, out_dir, dtype
        self.shard_tokens = shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_count = 0
        self.written: list[ShardInfo] = []

    def add(self, tokens: np.ndarray) -> None:
        self.pending.append(tokens)
        self.pending_count += len(tokens)
        if self.pending_count < self.shard_tokens:
            return
        buffer = np.concatenate(self.pending)
        full = len(buffer) - len(buffer) % self.shard_tokens
        for start in range(0, full, self.shard_tokens):
            self._write(buffer[start : start + self.shard_tokens])
        rest = buffer[full:]
        self.pending, self.pending_count = [rest], len(rest)

    def finish(self) -> list[ShardInfo]:
        if self.pending_count:
            self._write(np.concatenate(self.pending))
        self.pending, self.pending_count = [], 0
        return self.written

    def _write(self, tokens: np.ndarray) -> None:
        shard_id = f"{self.source.name}-{len(self.written):05d}"
        file = f"{shard_id}.bin"
        sha256 = write_shard(tokens, self.out_dir / file, self.dtype)
        self.written.append(
            ShardInfo(
                shard_id=shard_id,
                file=file,
                sha256=sha256,
                tokens=len(tokens),
                dtype=self.dtype,
                language=self.source.language,
                source=self.source.name,
                licence=self.source.licence,
            )
        )
