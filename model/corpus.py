"""`essaim data prepare`: sources -> filtered, deduplicated text -> tokenizer -> dated token shards.

Three passes, each streaming:
1. read every source (model.ingest), drop bad records and what the filters and the
   deduplicator reject, and spool the kept documents to disk, one file per source
   and date bucket (a year by default);
2. train the byte-level BPE on a sample of the spools drawn by source weight, and an
   English-only one beside it to show what the mixture gains in other languages;
3. encode each source's spools, oldest bucket first, into shards that never mix
   sources or buckets, so each shard's language, licence and dates are exact.

A held-out split is drawn in pass 1: of each source's kept documents, ``heldout_fraction``
(at least ``heldout_min_documents``), chosen by a hash of their text (model/heldout.py), so
preparing the same documents again holds out the same ones. They are left out of the
tokenizer's training text too, so nothing the pipeline fits has seen them, and encoded into
separate shards (the manifest's ``heldout``) that are never leased: models are evaluated on
them (model/evaluate.py).

Everything is written into a staging directory next to the output and renamed into
place at the end: a run that fails or stops leaves no half-written shard behind.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from model.corpus_config import Corpus, CorpusSettings, Source
from model.dedup import Deduplicator
from model.filters import QualityFilter, SourceReport
from model.heldout import HeldOutDraw
from model.ingest import BadRecord, read_source
from model.shards import Manifest, ShardInfo, SourceInfo, chunk_hashes, token_dtype, write_shard
from model.text_bytes import text_bytes, token_byte_lengths
from model.tokenizer import EOS_ID, tokenizer_sha256, train_tokenizer

REPORT_FILE = "prepare-report.json"
HELD_OUT_EVERY = 10  # every 10th kept document is left out of tokenizer training to measure fertility
# Held-out shards are named apart from training ones: a source name cannot start with "_".
HELDOUT_PREFIX = "_heldout-"
# Documents encode in batches (parallel in `tokenizers`) of at most this many documents and
# characters: an encoding holds ~100 bytes per token, so the character bound keeps memory flat.
_ENCODE_BATCH_DOCUMENTS = 256
_ENCODE_BATCH_CHARS = 250_000
_PIECE_CHARS = 100_000  # longer documents are encoded piece by piece (see _pieces)


class PrepareStopped(ValueError):
    """A bad record with ``on_bad_record = "stop"``: preparation ended and wrote nothing."""


@dataclass
class PrepareReport:
    sources: dict[str, SourceReport]  # a source's `tokens` are its training tokens
    fertility: dict[str, dict[str, float]] = field(default_factory=dict)  # language -> figures
    tokenizer: dict[str, object] = field(default_factory=dict)
    heldout: dict[str, dict[str, int]] = field(default_factory=dict)  # source -> documents, tokens, text_bytes

    def to_json(self) -> dict:
        return {"sources": {n: asdict(r) for n, r in self.sources.items()},
                "fertility": self.fertility, "tokenizer": self.tokenizer, "heldout": self.heldout}


def prepare_corpus(
    corpus: Corpus,
    out_dir: Path,
    *,
    vocab_size: int | None = None,
    shard_tokens: int | None = None,
    chunk_bytes: int | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> tuple[Manifest, PrepareReport]:
    """Prepare ``corpus`` into ``out_dir`` (new, empty, or an earlier preparation to replace).

    ``vocab_size``, ``shard_tokens`` and ``chunk_bytes``, when given, override the config's [corpus] values.
    """
    given = {"vocab_size": vocab_size, "shard_tokens": shard_tokens, "chunk_bytes": chunk_bytes}
    overrides = {k: v for k, v in given.items() if v is not None}
    corpus = replace(corpus, settings=CorpusSettings(**{**corpus.settings.model_dump(), **overrides}))
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    staging = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        report = PrepareReport({s.name: SourceReport() for s in corpus.sources})
        spools, draws = _filter_to_spools(corpus, staging / "spool", report, log)
        settings = corpus.settings
        heldout = {name: draw.heldout(settings.heldout_fraction, settings.heldout_min_documents)
                   for name, draw in draws.items()}
        log("training the tokenizer on the weighted mixture")
        tokenizer = train_tokenizer(
            _weighted_sample(corpus.sources, spools, report, settings.tokenizer_chars, heldout), settings.vocab_size,
            staging / "tokenizer",
        )
        english = [s for s in corpus.sources if s.language == "en"]
        english_tokenizer = None
        if english:
            log("training an English-only tokenizer for comparison")
            english_tokenizer = train_tokenizer(
                _weighted_sample(english, spools, report, settings.tokenizer_chars, heldout), settings.vocab_size,
                staging / "spool" / "english-tokenizer",
            )
        report.tokenizer = {"vocab_size": len(tokenizer), "sha256": tokenizer_sha256(staging / "tokenizer")}
        report.fertility = _fertility(corpus.sources, spools, tokenizer, english_tokenizer, settings.fertility_chars)
        log("encoding shards")
        shards, heldout_shards = _write_shards(corpus, spools, tokenizer, staging, report, heldout)
        manifest = Manifest(settings.vocab_size, tokenizer_sha256(staging / "tokenizer"), _source_infos(corpus), shards,
                            chunk_bytes=settings.chunk_bytes, heldout=heldout_shards)
        shutil.rmtree(staging / "spool")
        (staging / REPORT_FILE).write_text(json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n")
        manifest.save(staging / "manifest.json")
        _publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest, report


def _check_out_dir(out_dir: Path) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file: give a directory for the prepared corpus")
    if (out_dir / "coordinator.db").exists():
        raise ValueError(f"{out_dir} holds a run's database (coordinator.db): prepare into a new directory")
    if any(out_dir.iterdir()) and not (out_dir / "manifest.json").exists():
        raise ValueError(f"{out_dir} is not empty and holds no prepared corpus: choose a new or empty directory")


def _publish(staging: Path, out_dir: Path) -> None:
    """Swap the finished staging directory in; an earlier preparation is removed only after."""
    previous = out_dir.with_name(f".{out_dir.name}.previous-{os.getpid()}")
    if out_dir.exists():
        out_dir.rename(previous)
    staging.rename(out_dir)
    shutil.rmtree(previous, ignore_errors=True)


# -- pass 1: filter and spool ----------------------------------------------------------------


def _bucket(day: dt.date, granularity: str) -> str:
    return f"{day.year:04d}" if granularity == "year" else f"{day.year:04d}-{day.month:02d}"


def _filter_to_spools(
    corpus: Corpus, spool_dir: Path, report: PrepareReport, log: Callable[[str], None]
) -> tuple[dict[str, dict[str, Path]], dict[str, HeldOutDraw]]:
    """Kept documents as JSON lines {text, date, key}, per source and date bucket; each source's draw."""
    deduplicator = Deduplicator(corpus.dedup)
    spools: dict[str, dict[str, Path]] = {}
    draws: dict[str, HeldOutDraw] = {}
    for source in corpus.sources:
        log(f"reading {source.name}")
        quality = QualityFilter(source)
        counts = report.sources[source.name]
        files: dict[str, object] = {}
        spools[source.name] = {}
        draws[source.name] = draw = HeldOutDraw()
        try:
            for item in read_source(source):
                if isinstance(item, BadRecord):
                    if corpus.settings.on_bad_record == "stop":
                        raise PrepareStopped(
                            f"{item}. Stopped, as the corpus config says (on_bad_record = \"stop\"); nothing was "
                            "written. Fix the record, or set on_bad_record = \"skip\" to leave such records out"
                        )
                    counts.bad(str(item))
                    continue
                counts.records += 1
                reason = quality.reason(item) or deduplicator.reason(item.text)
                if reason:
                    counts.remove(reason, len(item.text))
                    continue
                counts.keep(len(item.text))
                bucket = _bucket(item.date, corpus.settings.date_bucket)
                if bucket not in files:
                    path = spool_dir / source.name / f"{bucket}.jsonl"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    files[bucket] = open(path, "w", encoding="utf-8")
                    spools[source.name][bucket] = path
                key = draw.add(item.text)
                record = {"text": item.text, "date": item.date.isoformat(), "key": key}
                files[bucket].write(json.dumps(record, ensure_ascii=False) + "\n")
        finally:
            for handle in files.values():
                handle.close()
    return spools, draws


def _spooled(spools: dict[str, Path]) -> Iterator[tuple[str, dt.date, int]]:
    """A source's kept documents as (text, date, key), oldest bucket first."""
    for bucket in sorted(spools):
        with open(spools[bucket], encoding="utf-8") as lines:
            for line in lines:
                record = json.loads(line)
                yield record["text"], dt.date.fromisoformat(record["date"]), record["key"]


# -- pass 2: tokenizer -----------------------------------------------------------------------


def _weighted_sample(
    sources: list[Source], spools: dict[str, dict[str, Path]], report: PrepareReport, budget_chars: int,
    heldout: dict[str, frozenset[int]],
) -> Iterator[str]:
    """About ``budget_chars`` of training text, each source contributing in proportion to its weight.

    A source with more weight than text is repeated (whole documents, so BPE counts scale),
    one with less is sampled. Held-out documents are skipped: fertility is measured on every
    tenth one, and models are evaluated on the held-out split.
    """
    weighted = [s for s in sources if s.weight > 0 and report.sources[s.name].kept_chars]
    total_weight = sum(s.weight for s in weighted)
    budget = min(budget_chars, sum(report.sources[s.name].kept_chars for s in weighted))
    for source in weighted:
        rate = budget * source.weight / total_weight / report.sources[source.name].kept_chars
        rng = random.Random(f"tokenizer-sample-{source.name}")
        for index, (text, _, key) in enumerate(_spooled(spools[source.name])):
            if index % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 or key in heldout[source.name]:
                continue
            for _ in range(int(rate) + (rng.random() < rate - int(rate))):
                yield text


def _fertility(sources, spools, tokenizer, english_tokenizer, budget_chars: int) -> dict[str, dict[str, float]]:  # type: ignore[no-untyped-def]
    """Tokens per word on each language's held-out documents, for both tokenizers."""
    figures: dict[str, dict[str, float]] = {}
    for language in sorted({s.language for s in sources}):
        chosen = [s for s in sources if s.language == language]
        texts = _text_sample(chosen, spools, budget_chars, held_out_only=True)
        held_out = bool(texts)
        if not held_out:  # too few documents to hold any out: measure on what there is
            texts = _text_sample(chosen, spools, budget_chars, held_out_only=False)
        words = sum(len(t.split()) for t in texts)
        if not words:
            continue
        entry: dict[str, float] = {"documents": len(texts), "words": words, "held_out": held_out,
                                   "tokens_per_word": _count_tokens(tokenizer, texts) / words}
        if english_tokenizer is not None:
            entry["english_only_tokens_per_word"] = _count_tokens(english_tokenizer, texts) / words
        figures[language] = entry
    return figures


def _text_sample(sources: list[Source], spools, budget_chars: int, held_out_only: bool) -> list[str]:  # type: ignore[no-untyped-def]
    texts: list[str] = []
    used = 0
    for source in sources:
        for index, (text, _, _) in enumerate(_spooled(spools[source.name])):
            if held_out_only and index % HELD_OUT_EVERY != HELD_OUT_EVERY - 1:
                continue
            texts.append(text[: budget_chars - used])
            used += len(texts[-1])
            if used >= budget_chars:
                return texts
    return texts


def _count_tokens(tokenizer, texts: list[str]) -> int:  # type: ignore[no-untyped-def]
    encoder = tokenizer.backend_tokenizer
    return sum(len(e.ids) for batch in _batches(texts) for e in encoder.encode_batch(batch, add_special_tokens=False))


def _pieces(documents: Iterator[tuple[str, dt.date]]) -> Iterator[tuple[str, dt.date, bool]]:
    """Documents as (text, date, ends_document), long ones cut into pieces of at most _PIECE_CHARS.

    Cuts fall after a lone newline between two visible characters, where the byte-level
    pre-tokenizer splits anyway, so a long document encodes as it would whole.
    """
    for text, day in documents:
        while len(text) > _PIECE_CHARS:
            cut = text.rfind("\n", 0, _PIECE_CHARS - 1)
            while cut > 0 and (text[cut - 1].isspace() or text[cut + 1].isspace()):
                cut = text.rfind("\n", 0, cut)
            cut = cut + 1 if cut > 0 else _PIECE_CHARS
            yield text[:cut], day, False
            text = text[cut:]
        yield text, day, True


def _batches(items, text=lambda item: item):  # type: ignore[no-untyped-def]
    """Consecutive lists of items, each within the encode batch bounds."""
    batch, chars = [], 0
    for item in items:
        batch.append(item)
        chars += len(text(item))
        if len(batch) == _ENCODE_BATCH_DOCUMENTS or chars >= _ENCODE_BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


# -- pass 3: shards --------------------------------------------------------------------------


def _write_shards(corpus: Corpus, spools, tokenizer, out_dir: Path, report: PrepareReport,  # type: ignore[no-untyped-def]
                  heldout: dict[str, frozenset[int]]) -> tuple[list[ShardInfo], list[ShardInfo]]:
    """Each source's training shards, and its held-out shards (the documents whose key is in ``heldout[name]``)."""
    encoder = tokenizer.backend_tokenizer  # the raw `tokenizers` object: batch encoding runs on every core
    lengths = token_byte_lengths(encoder)
    settings = corpus.settings
    dtype = token_dtype(settings.vocab_size)
    shards: list[ShardInfo] = []
    heldout_shards: list[ShardInfo] = []
    for source in corpus.sources:
        writer = _ShardWriter(source, source.name, out_dir, dtype, settings.shard_tokens, settings.chunk_bytes, lengths)
        held = _ShardWriter(source, HELDOUT_PREFIX + source.name, out_dir, dtype, settings.shard_tokens,
                            settings.chunk_bytes, lengths)
        for bucket in sorted(spools[source.name]):
            documents = _spooled({bucket: spools[source.name][bucket]})
            for batch in _batches(documents, text=lambda document: document[0]):
                for target, chosen in ((writer, [(t, d) for t, d, key in batch if key not in heldout[source.name]]),
                                       (held, [(t, d) for t, d, key in batch if key in heldout[source.name]])):
                    for pieces in _batches(_pieces(iter(chosen)), text=lambda piece: piece[0]):
                        target.add_batch(encoder, pieces)
            writer.flush()  # a shard never spans two date buckets (held-out ones may: they are never leased)
        held.flush()
        report.sources[source.name].tokens = sum(s.tokens for s in writer.written)
        report.heldout[source.name] = {"documents": held.documents, "tokens": sum(s.tokens for s in held.written),
                                       "text_bytes": sum(s.text_bytes for s in held.written)}
        shards.extend(writer.written)
        heldout_shards.extend(held.written)
    return shards, heldout_shards


class _ShardWriter:
    """Cuts one source's token stream into shards of ``shard_tokens``, noting their documents' dates and bytes."""

    def __init__(self, source: Source, prefix: str, out_dir: Path, dtype: str, shard_tokens: int, chunk_bytes: int,
                 byte_lengths: np.ndarray) -> None:
        self.source, self.prefix, self.out_dir, self.dtype = source, prefix, out_dir, dtype
        self.shard_tokens, self.chunk_bytes, self.byte_lengths = shard_tokens, chunk_bytes, byte_lengths
        self.parts: list[np.ndarray] = []
        self.dates: list[dt.date] = []
        self.count = 0
        self.bytes = 0  # of the text the pending tokens encode
        self.documents = 0  # whose last token was written
        self.written: list[ShardInfo] = []

    def add_batch(self, encoder, pieces: list[tuple[str, dt.date, bool]]) -> None:  # type: ignore[no-untyped-def]
        encodings = encoder.encode_batch([text for text, _, _ in pieces], add_special_tokens=False)
        for encoding, (_, day, ends_document) in zip(encodings, pieces):
            self._add(np.asarray([*encoding.ids, EOS_ID] if ends_document else encoding.ids, dtype=np.int64), day)
            self.documents += ends_document

    def _add(self, tokens: np.ndarray, day: dt.date) -> None:
        offset = 0
        while offset < len(tokens):
            take = min(self.shard_tokens - self.count, len(tokens) - offset)
            self.parts.append(tokens[offset : offset + take])
            self.dates.append(day)
            self.count += take
            self.bytes += text_bytes(self.byte_lengths, self.parts[-1])  # exact where a document straddles shards
            offset += take
            if self.count == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if not self.count:
            return
        shard_id = f"{self.prefix}-{len(self.written):05d}"
        file = f"{shard_id}.bin"
        sha256 = write_shard(np.concatenate(self.parts), self.out_dir / file, self.dtype)
        self.written.append(
            ShardInfo(
                shard_id=shard_id, file=file, sha256=sha256, tokens=self.count, dtype=self.dtype,
                language=self.source.language, source=self.source.name, licence=self.source.licence,
                date_from=min(self.dates).isoformat(), date_to=max(self.dates).isoformat(),
                chunk_sha256=chunk_hashes(self.out_dir / file, self.chunk_bytes), text_bytes=self.bytes,
            )
        )
        self.parts, self.dates, self.count, self.bytes = [], [], 0, 0


def _source_infos(corpus: Corpus) -> list[SourceInfo]:
    return [
        SourceInfo(s.name, s.language, s.licence, s.weight, s.date_from.isoformat(), s.date_to.isoformat())
        for s in corpus.sources
    ]
