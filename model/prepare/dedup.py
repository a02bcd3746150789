"""Stages 2 to 7: exact and near-duplicate removal across the whole corpus, on disk, with datatrove.

Exact duplicates (the same text, white space at its ends aside) are found by datatrove's
exact-dedup stages, near duplicates by its MinHash stages (signatures per task, duplicate
pairs per LSH band, clusters, filter), computed on what exact dedup kept, as before.
Nothing grows in memory with the corpus but the clusters of duplicates themselves.

What the first document seen means across tasks: exact duplicates keep the highest
priority, which is the lowest task (work.py gives tasks contiguous runs of the input),
then the lowest position. MinHash pairs are written (earlier, later); a cluster keeps
the earlier of two, but datatrove joins bigger clusters by size, so in a cluster of three
or more the one kept may be a later one.

The MinHash settings map onto datatrove's: word n-grams of the lower-cased text split on
white space (as before; WordShingleSignature hashes them faster), and of the
``minhash_permutations`` hashes, ``bands`` bands of ``rows`` hashes whose threshold
``(1 / bands) ** (1 / rows)`` is nearest ``near_threshold``.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import xxhash
from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
from datatrove.utils.hashing import HashConfig
from datatrove.utils.text import TextNormConfig
from datatrove.utils.word_tokenizers import WordTokenizer

from model.corpus_config import Corpus, DedupSettings
from model.heldout import document_key
from model.prepare.filtering import write_json_atomically
from model.prepare.work import WorkDir, spool_index

MAX_TASKS = 65_534  # exact dedup's priorities are 16-bit: task r's documents have priority 65535 - r


def lsh_bands(threshold: float, permutations: int) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= permutations, whose LSH threshold is nearest ``threshold``."""
    shapes = [(permutations // rows, rows) for rows in range(1, permutations + 1)]
    return min(shapes, key=lambda shape: abs((1 / shape[0]) ** (1 / shape[1]) - threshold))


def minhash_config(settings: DedupSettings) -> MinhashConfig:
    bands, rows = lsh_bands(settings.near_threshold, settings.minhash_permutations)
    words_only = TextNormConfig(lowercase=True, norm_whitespace=True, remove_punctuation=False,
                                norm_unicode_diacritics=False, norm_numbers=False)
    return MinhashConfig(n_grams=settings.shingle_words, num_buckets=bands, hashes_per_bucket=rows, seed=1,
                         norm_config=words_only, hash_config=HashConfig(precision=64, hash_fc="xxhash"))


def stripped_text(document: Document) -> bytes:
    return document.text.strip().encode("utf-8")


def first_seen(document: Document) -> int:
    return 65_535 - document.metadata["rank"]


EXACT = ExactDedupConfig(content_getter=stripped_text, document_priority=first_seen,
                         hash_config=HashConfig(precision=64, hash_fc="xxhash"))


class WhitespaceWords(WordTokenizer):
    """Words are what white space separates: the shingles the in-memory deduplicator used."""

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(0, len(text))]


class WordShingleSignature(MinhashDedupSignature):
    """datatrove's MinHash signatures, with shingles hashed from their words' hashes.

    datatrove joins each n-gram into a string and hashes it: a Python call per shingle. Here each
    word is hashed once, and a shingle's hash is the n words' hashes combined in numpy (a
    polynomial in uint64, wrapping): the same shingles up to hash collisions, for a hash call per word.
    """

    def __init__(self, output_folder: str, config: MinhashConfig) -> None:
        super().__init__(output_folder, config, language=WhitespaceWords())

    def get_shingles(self, text: str) -> np.ndarray:
        # What datatrove's simplify_text (lower case, white space runs as one space) then a split on
        # white space give, without the regular expression: re's \s is str.split's white space.
        words = text.lower().split()
        count = len(words) - self.config.n_grams + 1
        if count < 1:
            return np.empty((0, 1), dtype=np.uint64)
        hashes = np.fromiter(map(xxhash.xxh64_intdigest, words), dtype=np.uint64, count=len(words))
        shingles = np.zeros(count, dtype=np.uint64)
        for offset in range(self.config.n_grams):
            shingles = shingles * _SHINGLE_BASE + hashes[offset : offset + count]
        return shingles.reshape(-1, 1)

    def get_signature(self, shingles: np.ndarray) -> list[list[int]]:
        """datatrove's signature, its shingles x permutations table computed in blocks of rows.

        In one piece that table takes 1 KB per word (128 permutations of 8 bytes, and temporaries):
        over 100 MB for a long source file. The minimum of blocks' minima is the same signature.
        """
        a, b = self.parameters
        lowest = np.full(a.shape[-1], np.iinfo(np.uint64).max, dtype=np.uint64)
        for start in range(0, len(shingles), _SIGNATURE_BLOCK):
            block = (shingles[start : start + _SIGNATURE_BLOCK] * a + b) % _MERSENNE_PRIME
            np.minimum(lowest, block.min(axis=0), out=lowest)
        if self.config.hash_config.precision == 32:
            lowest = np.bitwise_and(lowest, self.config.hash_config.max)
        return lowest.astype(self.config.hash_config.np_dtype).reshape(self.config.num_buckets, -1).tolist()


_SHINGLE_BASE = np.uint64(0x100000001B3)  # FNV's 64-bit prime: any odd multiplier spreads the words' order
_SIGNATURE_BLOCK = 2048  # shingles a block: 2 MB of table
_MERSENNE_PRIME = np.uint64((1 << 61) - 1)  # datatrove's modulus for the permutations


class KeptReader(PipelineStep):
    """Task ``rank``'s documents that passed the quality filters, in input order."""

    name = "kept documents"
    type = "essaim"

    def __init__(self, work: WorkDir) -> None:
        super().__init__()
        self.work = work

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> Iterator[Document]:  # type: ignore[no-untyped-def]
        with open(self.work.kept(rank), encoding="utf-8") as lines:
            for index, line in enumerate(lines):
                record = json.loads(line)
                yield Document(record["text"], f"{rank}/{index}",
                               metadata={"source": record["source"], "date": record["date"], "rank": rank})


class Tally(PipelineStep):
    """Passes documents on, counting them and their characters per source (under ``counts/<label>``)."""

    name = "tally"
    type = "essaim"

    def __init__(self, work: WorkDir, label: str) -> None:
        super().__init__()
        self.work, self.label = work, label

    def run(self, data, rank: int = 0, world_size: int = 1) -> Iterator[Document]:  # type: ignore[no-untyped-def]
        counts: dict[str, dict[str, int]] = {}
        for document in data:
            tally = counts.setdefault(document.metadata["source"], {"documents": 0, "chars": 0})
            tally["documents"] += 1
            tally["chars"] += len(document.text)
            yield document
        write_json_atomically(self.work.counts(self.label, rank), counts)


def read_tallies(work: WorkDir, label: str) -> dict[str, dict[str, int]]:
    """What the tasks' Tally steps under ``label`` counted, summed per source."""
    total: dict[str, dict[str, int]] = {}
    for path in work.counts_of(label):
        for name, counts in json.loads(path.read_text()).items():
            into = total.setdefault(name, {"documents": 0, "chars": 0})
            into["documents"] += counts["documents"]
            into["chars"] += counts["chars"]
    return total


class SpoolWriter(PipelineStep):
    """The deduplicated documents, per source and date bucket, each spool with its index, and the held-out keys.

    A spool's index (work.py's spool_index) holds each line's (key, byte offset), so the tokenizer stage
    reads only the documents it samples; the task's (key, chars) per source are saved sorted by key,
    so the held-out draw merges them without loading them all.
    """

    name = "spool"
    type = "essaim"

    def __init__(self, corpus: Corpus, work: WorkDir) -> None:
        super().__init__()
        self.work, self.granularity = work, corpus.settings.date_bucket
        self.sources = [source.name for source in corpus.sources]

    def run(self, data, rank: int = 0, world_size: int = 1) -> None:  # type: ignore[no-untyped-def]
        spools: dict[tuple[str, str], Spool] = {}
        keys = {name: (array("Q"), array("Q")) for name in self.sources}  # (key, chars): 16 bytes a document
        try:
            for document in data:
                source, date = document.metadata["source"], document.metadata["date"]
                bucket = date[:4] if self.granularity == "year" else date[:7]
                if (source, bucket) not in spools:
                    spools[source, bucket] = Spool(self.work.spool(source, bucket, rank))
                key = document_key(document.text)
                keys[source][0].append(key)
                keys[source][1].append(len(document.text))
                spools[source, bucket].write(document.text, date, key)
        finally:
            for spool in spools.values():
                spool.close()
        for source, (key_array, chars) in keys.items():
            pairs = np.stack([np.frombuffer(key_array, dtype=np.uint64), np.frombuffer(chars, dtype=np.uint64)], axis=1)
            path = self.work.heldout_keys(source, rank)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, pairs[np.argsort(pairs[:, 0], kind="stable")])


class Spool:
    """One spool file being written (JSON lines of text, date and key) and its index."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.file = path, open(path, "wb")
        self.keys, self.offsets = array("Q"), array("Q")
        self.written = 0

    def write(self, text: str, date: str, key: int) -> None:
        line = (json.dumps({"text": text, "date": date, "key": key}, ensure_ascii=False) + "\n").encode("utf-8")
        self.file.write(line)
        self.keys.append(key)
        self.offsets.append(self.written)
        self.written += len(line)

    def close(self) -> None:
        self.file.close()
        index = np.stack([np.frombuffer(self.keys, dtype=np.uint64), np.frombuffer(self.offsets, dtype=np.uint64)],
                         axis=1)
        np.save(spool_index(self.path), index)
