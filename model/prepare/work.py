"""The work directory of a preparation, and which input files each task reads.

Every stage's tasks write under one work directory, next to the output: what one task
writes, a later stage reads, whether the tasks ran in local processes or as Slurm jobs
on other nodes (the directory must then be on a shared file system). Each stage's
datatrove logs, completion markers included, live under ``logs/<stage>``: preparing the
same corpus again into the same output resumes where a failed run stopped.

Tasks read contiguous runs of the input files in the corpus order (sources as the config
lists them, each source's files in name order), balanced by size. Task ``r`` thus holds
documents that all come before task ``r + 1``'s, and "the first document seen" of a set
of duplicates is the one with the lowest (task, position) everywhere in the pipeline.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from model.corpus_config import Corpus
from model.ingest import source_files

PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class InputFile:
    source: str
    path: str
    format: str
    size: int


@dataclass(frozen=True)
class WorkDir:
    root: Path

    def logs(self, stage: str) -> Path:
        return self.root / "logs" / stage

    def kept(self, rank: int) -> Path:
        """Task ``rank``'s documents that passed the quality filters, in input order (JSON lines)."""
        return self.root / "kept" / f"{rank:05d}.jsonl"

    def counts(self, stage: str, rank: int) -> Path:
        return self.root / "counts" / stage / f"{rank:05d}.json"

    def counts_of(self, stage: str) -> list[Path]:
        return sorted((self.root / "counts" / stage).glob("*.json"))

    @property
    def exact(self) -> Path:
        return self.root / "exact"

    @property
    def minhash(self) -> Path:
        return self.root / "minhash"

    def spool(self, source: str, bucket: str, rank: int) -> Path:
        """Task ``rank``'s kept documents of one source and date bucket, deduplicated (JSON lines)."""
        return self.root / "spool" / source / bucket / f"{rank:05d}.jsonl"

    def spools(self, source: str) -> list[Path]:
        """A source's spools in corpus order: oldest bucket first, then by task."""
        return sorted((self.root / "spool" / source).glob("*/*.jsonl"))

    def heldout_keys(self, source: str, rank: int) -> Path:
        """The (key, chars) of task ``rank``'s kept documents of a source (model/heldout.py draws from them)."""
        return self.root / "keys" / source / f"{rank:05d}.npy"

    def heldout_chosen(self, source: str) -> Path:
        return self.root / "heldout" / f"{source}.npy"

    def tokens(self, spool: Path, split: str) -> Path:
        """Where a spool's tokens go: ``split`` is "train" or "heldout"; ``.docs.npy`` beside holds its documents."""
        relative = spool.relative_to(self.root / "spool").with_suffix("")
        return self.root / "tokens" / relative.parent / f"{relative.name}.{split}.bin"

    def shard_entries(self, rank: int) -> Path:
        """The manifest entries of the shards task ``rank`` wrote."""
        return self.root / "shards" / f"{rank:05d}.json"

    @property
    def tokenizer_figures(self) -> Path:
        return self.root / "tokenizer.json"

    @property
    def output(self) -> Path:
        """The prepared corpus being written, renamed into place when every stage is done."""
        return self.root / "output"


def spool_index(spool: Path) -> Path:
    """Beside a spool: each line's (key, byte offset), as a (lines, 2) uint64 array."""
    return spool.with_suffix(".index.npy")


def plan_inputs(corpus: Corpus, tasks: int) -> list[list[InputFile]]:
    """The input files of each of ``tasks`` tasks: contiguous runs in corpus order, of about equal bytes."""
    files = [InputFile(source.name, str(path), file_format, path.stat().st_size)
             for source in corpus.sources for path, file_format in source_files(source)]
    total = sum(f.size for f in files) or 1
    plan: list[list[InputFile]] = [[] for _ in range(tasks)]
    done = 0
    for file in files:
        # A file goes to the task whose share of the bytes its middle falls in.
        rank = min(tasks - 1, int((done + file.size / 2) * tasks / total))
        plan[rank].append(file)
        done += file.size
    return plan


def fingerprint(corpus: Corpus, plan: list[list[InputFile]], stages: list[str]) -> str:
    """What a work directory was made from: a rerun resumes in it only if this is unchanged."""
    described = {"corpus": repr(corpus), "plan": [[asdict(f) for f in files] for files in plan], "stages": stages,
                 "modified": [Path(f.path).stat().st_mtime_ns for files in plan for f in files]}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()
