"""Stages 9 and 10: encode the spools into tokens (one task per filter task), then cut them into shards (one task).

Encoding is where the CPU goes, so it runs in every task, each on the spools its own
filter task wrote; each spool's training and held-out documents become token files with
their documents' ends and dates beside. The last stage concatenates each source's token
files in corpus order (oldest bucket first, then by task) and cuts them into shards that
never mix sources or buckets, so each shard's language, licence and dates are exact: the
same shards, byte for byte, as encoding the whole source in one stream. It then writes
the manifest and the prepare report.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from datatrove.pipeline.base import PipelineStep

from model.corpus_config import Corpus
from model.filters import OptOuts, SourceReport
from model.heldout import held_out
from model.prepare.dedup import read_tallies
from model.prepare.filtering import read_counts, write_json_atomically
from model.prepare.tokenizer_stage import batches, spooled
from model.prepare.work import WorkDir
from model.shards import Manifest, ShardInfo, SourceInfo, chunk_hashes, token_dtype, write_shard
from model.text_bytes import text_bytes, token_byte_lengths
from model.tokenizer import EOS_ID, load_tokenizer, pretoken_pieces

REPORT_FILE = "prepare-report.json"
# Held-out shards are named apart from training ones: a source name cannot start with "_".
HELDOUT_PREFIX = "_heldout-"
SPLITS = ("train", "heldout")


@dataclass
class PrepareReport:
    sources: dict[str, SourceReport]  # a source's `tokens` are its training tokens
    fertility: dict[str, dict[str, float]] = field(default_factory=dict)  # language -> figures
    tokenizer: dict[str, object] = field(default_factory=dict)
    heldout: dict[str, dict[str, int]] = field(default_factory=dict)  # source -> documents, tokens, text_bytes
    # source -> the text-and-data-mining reservation lists its documents were checked against (tdm_opt_out)
    tdm_opt_outs: dict[str, list[dict]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"sources": {n: asdict(r) for n, r in self.sources.items()},
                "fertility": self.fertility, "tokenizer": self.tokenizer, "heldout": self.heldout,
                "tdm_opt_outs": self.tdm_opt_outs}


def pieces(documents: Iterator[tuple[str, int]]) -> Iterator[tuple[str, int, bool]]:
    """Documents as (text, date, ends_document), long ones cut into pieces (model.tokenizer.pretoken_pieces)."""
    for text, day in documents:
        cut = list(pretoken_pieces(text))
        for number, piece in enumerate(cut, start=1):
            yield piece, day, number == len(cut)


class EncodeSpools(PipelineStep):
    name = "encode"
    type = "essaim"

    def __init__(self, corpus: Corpus, work: WorkDir) -> None:
        super().__init__()
        self.corpus, self.work = corpus, work

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> None:  # type: ignore[no-untyped-def]
        encoder = load_tokenizer(self.work.output / "tokenizer").backend_tokenizer  # batches run on every core
        dtype = token_dtype(self.corpus.settings.vocab_size)
        for source in self.corpus.sources:
            heldout = np.load(self.work.heldout_chosen(source.name))  # ascending keys
            for spool in self.work.spools(source.name):
                if spool.name == f"{rank:05d}.jsonl":
                    self._encode(encoder, spool, heldout, dtype)

    def _encode(self, encoder, spool: Path, heldout: np.ndarray, dtype: str) -> None:  # type: ignore[no-untyped-def]
        outputs = {split: TokenFile(self.work.tokens(spool, split), dtype) for split in SPLITS}
        documents = ((text, dt.date.fromisoformat(date).toordinal(), key) for text, date, key in spooled([spool]))
        for batch in batches(documents, text=lambda document: document[0]):
            held = held_out(heldout, np.asarray([key for _, _, key in batch], dtype=np.uint64)).tolist()
            for split, chosen in (("train", [(t, d) for (t, d, _), out in zip(batch, held) if not out]),
                                  ("heldout", [(t, d) for (t, d, _), out in zip(batch, held) if out])):
                for piece_batch in batches(pieces(iter(chosen)), text=lambda piece: piece[0]):
                    # without the offsets (encode_batch_fast): the same ids, a sixth faster
                    encodings = encoder.encode_batch_fast([text for text, _, _ in piece_batch],
                                                          add_special_tokens=False)
                    for encoding, (_, day, ends) in zip(encodings, piece_batch):
                        outputs[split].add([*encoding.ids, EOS_ID] if ends else encoding.ids, day, ends)
        for output in outputs.values():
            output.close()


class TokenFile:
    """A spool's tokens of one split, and beside them each piece's (end, date ordinal, ends a document)."""

    def __init__(self, path: Path, dtype: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.dtype = path, dtype
        self.file = open(path, "wb")
        self.pieces: list[tuple[int, int, int]] = []
        self.count = 0

    def add(self, ids: list[int], day: int, ends_document: bool) -> None:
        np.asarray(ids, dtype=self.dtype).tofile(self.file)
        self.count += len(ids)
        self.pieces.append((self.count, day, ends_document))

    def close(self) -> None:
        self.file.close()
        np.save(documents_path(self.path), np.asarray(self.pieces, dtype=np.int64).reshape(-1, 3))


def documents_path(tokens: Path) -> Path:
    return tokens.with_suffix(".docs.npy")


@dataclass(frozen=True)
class PlannedShard:
    """A shard to write: its id and the token ranges, in order, of the token files it is cut from."""

    shard_id: str
    source: str
    heldout: bool
    segments: tuple[tuple[str, int, int], ...]  # (token file, first token, end token)


def plan_shards(corpus: Corpus, work: WorkDir) -> list[PlannedShard]:
    """Every shard of the corpus, in manifest order, from the token files' sizes alone.

    A source's training tokens are one stream per date bucket (oldest first), its held-out
    tokens one stream; each stream is cut every ``shard_tokens``, so where a shard ends does
    not depend on which task encoded what.
    """
    itemsize = np.dtype(token_dtype(corpus.settings.vocab_size)).itemsize
    planned: list[PlannedShard] = []
    for source in corpus.sources:
        spools = work.spools(source.name)
        buckets = sorted({spool.parent.name for spool in spools})
        train = [[work.tokens(s, "train") for s in spools if s.parent.name == bucket] for bucket in buckets]
        streams = [(source.name, False, files) for files in train]
        streams.append((HELDOUT_PREFIX + source.name, True, [work.tokens(s, "heldout") for s in spools]))
        numbers = {False: 0, True: 0}
        for prefix, heldout, files in streams:
            sizes = [(str(path), path.stat().st_size // itemsize) for path in files]
            for segments in _cut(sizes, corpus.settings.shard_tokens):
                planned.append(PlannedShard(f"{prefix}-{numbers[heldout]:05d}", source.name, heldout, segments))
                numbers[heldout] += 1
    return planned


def _cut(files: list[tuple[str, int]], shard_tokens: int) -> Iterator[tuple[tuple[str, int, int], ...]]:
    """A stream of token files cut into shards of ``shard_tokens`` (the last one shorter)."""
    segments: list[tuple[str, int, int]] = []
    count = 0
    for path, tokens in files:
        start = 0
        while start < tokens:
            take = min(shard_tokens - count, tokens - start)
            segments.append((path, start, start + take))
            count += take
            start += take
            if count == shard_tokens:
                yield tuple(segments)
                segments, count = [], 0
    if segments:
        yield tuple(segments)


class WriteShards(PipelineStep):
    """Writes every ``world_size``-th planned shard, starting at ``rank``; its manifest entries to a file."""

    name = "shards"
    type = "essaim"

    def __init__(self, corpus: Corpus, work: WorkDir) -> None:
        super().__init__()
        self.corpus, self.work = corpus, work

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> None:  # type: ignore[no-untyped-def]
        settings, out = self.corpus.settings, self.work.output
        lengths = token_byte_lengths(load_tokenizer(out / "tokenizer").backend_tokenizer)
        dtype = token_dtype(settings.vocab_size)
        sources = {source.name: source for source in self.corpus.sources}
        written = []
        for shard in plan_shards(self.corpus, self.work)[rank::world_size]:
            tokens = np.concatenate([np.memmap(path, dtype=dtype, mode="r")[start:end]
                                     for path, start, end in shard.segments])
            days = [day for path, start, end in shard.segments for day in _days(Path(path), start, end)]
            file = f"{shard.shard_id}.bin"
            source = sources[shard.source]
            info = ShardInfo(
                shard_id=shard.shard_id, file=file, sha256=write_shard(tokens, out / file, dtype), tokens=len(tokens),
                dtype=dtype, language=source.language, source=source.name, licence=source.licence,
                date_from=dt.date.fromordinal(min(days)).isoformat(), date_to=dt.date.fromordinal(max(days)).isoformat(),
                chunk_sha256=chunk_hashes(out / file, settings.chunk_bytes), text_bytes=text_bytes(lengths, tokens),
            )
            written.append(asdict(info))
        write_json_atomically(self.work.shard_entries(rank), written)


def _days(tokens: Path, start: int, end: int) -> list[int]:
    """The dates of the documents (pieces) with tokens in [start, end) of a token file."""
    pieces = np.load(documents_path(tokens), mmap_mode="r")  # (end token, date, ends a document), by end
    first = np.searchsorted(pieces[:, 0], start, side="right")  # the first piece ending after start
    last = np.searchsorted(pieces[:, 0], end, side="left")  # the first piece ending at or after end
    return pieces[first : last + 1, 1].tolist()


class WriteManifest(PipelineStep):
    """The manifest and the prepare report, from the shard tasks' entries and every stage's counts."""

    name = "manifest"
    type = "essaim"

    def __init__(self, corpus: Corpus, work: WorkDir, exact: bool, near: bool) -> None:
        super().__init__()
        self.corpus, self.work, self.exact, self.near = corpus, work, exact, near

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> None:  # type: ignore[no-untyped-def]
        settings, out = self.corpus.settings, self.work.output
        entries = {entry["shard_id"]: ShardInfo(**{**entry, "chunk_sha256": tuple(entry["chunk_sha256"])})
                   for path in sorted(self.work.shard_entries(0).parent.glob("*.json"))
                   for entry in json.loads(path.read_text())}
        planned = plan_shards(self.corpus, self.work)
        shards = [entries[p.shard_id] for p in planned if not p.heldout]
        heldout = [entries[p.shard_id] for p in planned if p.heldout]
        report = self._report()
        for source in self.corpus.sources:
            report.sources[source.name].tokens = sum(s.tokens for s in shards if s.source == source.name)
            held = [s for s in heldout if s.source == source.name]
            documents = sum(int(np.load(documents_path(self.work.tokens(spool, "heldout")))[:, 2].sum())
                            for spool in self.work.spools(source.name))
            report.heldout[source.name] = {"documents": documents, "tokens": sum(s.tokens for s in held),
                                           "text_bytes": sum(s.text_bytes for s in held)}
        tokenizer = json.loads(self.work.tokenizer_figures.read_text())
        report.tokenizer, report.fertility = tokenizer["tokenizer"], tokenizer["fertility"]
        (out / REPORT_FILE).write_text(json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n")
        sources = [SourceInfo(s.name, s.language, s.licence, s.weight, s.date_from.isoformat(), s.date_to.isoformat())
                   for s in self.corpus.sources]
        Manifest(settings.vocab_size, str(report.tokenizer["sha256"]), sources, shards, chunk_bytes=settings.chunk_bytes,
                 heldout=heldout).save(out / "manifest.json")

    def _report(self) -> PrepareReport:
        """The filter tasks' counts, with what each dedup stage removed: what passed it, less what passed the next."""
        filtered = read_counts(self.work.counts_of("filter"))
        stages = [("exact_duplicate", "exact")] if self.exact else []
        stages += [("near_duplicate", "deduplicated")] if self.near else []
        before = {name: {"documents": c.kept_documents, "chars": c.kept_chars} for name, c in filtered.items()}
        for reason, label in stages:
            after = read_tallies(self.work, label)
            for name, counts in filtered.items():
                passed = after.get(name, {"documents": 0, "chars": 0})
                if before[name]["documents"] > passed["documents"]:
                    counts.removed[reason] = {key: before[name][key] - passed[key] for key in ("documents", "chars")}
                before[name] = passed
        for name, counts in filtered.items():
            counts.kept_documents, counts.kept_chars = before[name]["documents"], before[name]["chars"]
        return PrepareReport({source.name: filtered.get(source.name, SourceReport()) for source in self.corpus.sources},
                             tdm_opt_outs={source.name: [_described(path) for path in source.filters.tdm_opt_outs]
                                           for source in self.corpus.sources if source.filters.tdm_opt_outs})


def _described(opt_out_list: Path) -> dict:
    """A reservation list as the report names it: its file, entries and digest (an auditor can check the list)."""
    return {"file": opt_out_list.name, "entries": OptOuts([opt_out_list]).entries,
            "sha256": hashlib.sha256(opt_out_list.read_bytes()).hexdigest()}
