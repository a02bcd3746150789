"""`essaim data prepare`: sources -> filtered, deduplicated text -> tokenizer -> dated token shards.

A datatrove pipeline of stages (model/prepare/), run by local processes or as Slurm job
arrays, each stage's tasks reading what the stage before wrote in a work directory:

1. filter: each task reads a contiguous run of the input files, counts bad records and
   applies the quality filters (model.filters);
2. exact and near-duplicate removal across the corpus, on disk (datatrove's exact-dedup
   and MinHash stages), then each task spools what it kept per source and date bucket
   (a year by default);
3. one task draws the held-out split and trains the byte-level BPE on a sample of the
   spools drawn by source weight (and an English-only one beside it, to show what the
   mixture gains in other languages);
4. each task encodes its spools, and one task cuts each source's tokens, oldest bucket
   first, into shards that never mix sources or buckets, so each shard's language,
   licence and dates are exact; it writes the manifest and the prepare report.

A held-out split is drawn in step 3: of each source's kept documents, ``heldout_fraction``
(at least ``heldout_min_documents``), chosen by a hash of their text (model/heldout.py), so
preparing the same documents again holds out the same ones. They are left out of the
tokenizer's training text too, and encoded into separate shards (the manifest's ``heldout``)
that are never leased: models are evaluated on them (model/evaluate.py).

Everything is written into the work directory next to the output and renamed into place at
the end: a run that fails or stops leaves no half-written shard behind. A failed run keeps
its work directory, and the same command resumes it without redoing finished tasks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from datatrove.pipeline.dedup.exact_dedup import ExactDedupFilter, ExactDedupSignature, ExactFindDedups
from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter
from datatrove.utils.logging import logger

from model.corpus_config import Corpus, CorpusSettings
from model.filters import SourceReport
from model.prepare.dedup import EXACT, KeptReader, SpoolWriter, Tally, WordShingleSignature, minhash_config
from model.prepare.executors import ExecutorSettings, PrepareFailed, Stage, dry_run, run_locally, run_on_slurm
from model.prepare.filtering import PrepareStopped, ReadAndFilter
from model.prepare.shards_stage import (
    HELDOUT_PREFIX,
    REPORT_FILE,
    EncodeSpools,
    PrepareReport,
    WriteManifest,
    WriteShards,
)
from model.prepare.tokenizer_stage import TrainTokenizer
from model.prepare.work import PLAN_FILE, InputFile, WorkDir, fingerprint, plan_inputs
from model.shards import Manifest

__all__ = ["HELDOUT_PREFIX", "REPORT_FILE", "ExecutorSettings", "PrepareFailed", "PrepareReport", "PrepareStopped",
           "prepare_corpus"]


def prepare_corpus(
    corpus: Corpus,
    out_dir: Path,
    *,
    vocab_size: int | None = None,
    shard_tokens: int | None = None,
    chunk_bytes: int | None = None,
    executor: ExecutorSettings | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> tuple[Manifest, PrepareReport]:
    """Prepare ``corpus`` into ``out_dir`` (new, empty, or an earlier preparation to replace).

    ``vocab_size``, ``shard_tokens`` and ``chunk_bytes``, when given, override the config's [corpus] values.
    """
    corpus, out_dir = _overridden(corpus, vocab_size, shard_tokens, chunk_bytes), Path(out_dir)
    executor = executor or ExecutorSettings()
    _check_out_dir(out_dir)
    work, run_id, stages = _work_dir(corpus, out_dir, executor, log)
    try:
        if executor.kind == "local":
            run_locally(stages, executor, work, log)
        else:
            run_on_slurm(stages, executor, work, run_id, log)
    except PrepareStopped:
        shutil.rmtree(work.root, ignore_errors=True)  # the input must change: nothing to resume
        raise
    manifest = Manifest.load(work.output / "manifest.json")
    report = load_report(work.output / REPORT_FILE)
    _publish(work.output, out_dir)
    shutil.rmtree(work.root, ignore_errors=True)
    return manifest, report


def print_slurm_jobs(corpus: Corpus, out_dir: Path, executor: ExecutorSettings, *, vocab_size: int | None = None,
                     shard_tokens: int | None = None, chunk_bytes: int | None = None) -> str:
    """The Slurm job scripts ``prepare_corpus`` would submit, submitting nothing (``--dry-run``)."""
    corpus, out_dir = _overridden(corpus, vocab_size, shard_tokens, chunk_bytes), Path(out_dir)
    _check_out_dir(out_dir)
    existed = _work_root(out_dir).exists()
    work, run_id, stages = _work_dir(corpus, out_dir, executor, lambda _: None)
    try:
        return dry_run(stages, executor, work, run_id)
    finally:
        if not existed:
            shutil.rmtree(work.root, ignore_errors=True)


def load_report(path: Path) -> PrepareReport:
    document = json.loads(path.read_text())
    sources = {name: SourceReport(**counts) for name, counts in document["sources"].items()}
    return PrepareReport(sources, document["fertility"], document["tokenizer"], document["heldout"],
                         document.get("tdm_opt_outs", {}))


def _overridden(corpus: Corpus, vocab_size: int | None, shard_tokens: int | None, chunk_bytes: int | None) -> Corpus:
    given = {"vocab_size": vocab_size, "shard_tokens": shard_tokens, "chunk_bytes": chunk_bytes}
    overrides = {k: v for k, v in given.items() if v is not None}
    return replace(corpus, settings=CorpusSettings(**{**corpus.settings.model_dump(), **overrides}))


def _work_root(out_dir: Path) -> Path:
    return out_dir.with_name(f".{out_dir.name}.prepare")


def _work_dir(corpus: Corpus, out_dir: Path, executor: ExecutorSettings,
              log: Callable[[str], None]) -> tuple[WorkDir, str, list[Stage]]:
    """The work directory (an earlier run's, to resume, if it was made from the same corpus), its id and stages."""
    work = WorkDir(_work_root(out_dir))
    plan = plan_inputs(corpus, executor.tasks)
    stages = _stages(corpus, plan, work)
    made_from = fingerprint(corpus, plan, [f"{s.name}:{s.tasks}" for s in stages])
    plan_file = work.root / PLAN_FILE
    if plan_file.exists() and json.loads(plan_file.read_text()).get("fingerprint") == made_from:
        log(f"resuming in {work.root}: finished tasks are not run again")
    else:
        shutil.rmtree(work.root, ignore_errors=True)
        work.root.mkdir(parents=True)
        plan_file.write_text(json.dumps({"fingerprint": made_from, "tasks": executor.tasks}))
    return work, hashlib.sha256(made_from.encode()).hexdigest()[:8], stages


def _stages(corpus: Corpus, plan: list[list[InputFile]], work: WorkDir) -> list[Stage]:
    tasks, dedup = len(plan), corpus.dedup
    exact, near = dedup.exact, dedup.near_threshold > 0
    minhash = minhash_config(dedup)

    def kept(tally: bool) -> list:  # type: ignore[type-arg]
        """A task's kept documents, less the exact duplicates when that stage runs."""
        steps = [KeptReader(work)]
        if exact:
            steps.append(ExactDedupFilter(str(work.exact / "duplicates"), EXACT))
            if tally:
                steps.append(Tally(work, "exact"))
        return steps

    stages = [Stage("filter", [ReadAndFilter(corpus, plan, work)], tasks)]
    if exact:
        stages += [
            # Signatures are split by hash range into one file per finder task: the merge runs in every task.
            Stage("exact-signatures", [KeptReader(work), _exact_signatures(work, tasks)], tasks),
            Stage("exact-duplicates", [ExactFindDedups(str(work.exact / "signatures"), str(work.exact / "duplicates"),
                                                       EXACT)], tasks),
        ]
    if near:
        signatures, buckets, clusters = (str(work.minhash / name) for name in ("signatures", "buckets", "clusters"))
        stages += [
            Stage("minhash-signatures",
                  [*kept(tally=False), WordShingleSignature(signatures, minhash)], tasks),
            Stage("minhash-buckets", [MinhashDedupBuckets(signatures, buckets, config=minhash)], minhash.num_buckets),
            Stage("minhash-clusters", [MinhashDedupCluster(buckets, clusters, config=minhash)], 1),
        ]
    remove_near = [MinhashDedupFilter(str(work.minhash / "clusters"))] if near else []
    return stages + [
        Stage("deduplicate", [*kept(tally=True), *remove_near, Tally(work, "deduplicated"), SpoolWriter(corpus, work)],
              tasks),
        Stage("tokenizer", [TrainTokenizer(corpus, work)], 1),
        Stage("encode", [EncodeSpools(corpus, work)], tasks),
        Stage("shards", [WriteShards(corpus, work)], tasks),
        Stage("manifest", [WriteManifest(corpus, work, exact, near)], 1),
    ]


def _exact_signatures(work: WorkDir, finders: int) -> ExactDedupSignature:
    logger.disable("datatrove")  # its reminder to run as many finder tasks: the next stage does
    try:
        return ExactDedupSignature(str(work.exact / "signatures"), EXACT, finder_workers=finders)
    finally:
        logger.enable("datatrove")


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
    """Swap the finished output in; an earlier preparation is removed only after."""
    previous = out_dir.with_name(f".{out_dir.name}.previous-{os.getpid()}")
    if out_dir.exists():
        out_dir.rename(previous)
    staging.rename(out_dir)
    shutil.rmtree(previous, ignore_errors=True)
