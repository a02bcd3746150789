"""`data prepare` on datatrove: duplicates across tasks, the same answers as the in-memory pipeline, resuming.

The golden answers (tests/data/prepare-before-datatrove.json) were written by the pipeline this
one replaced (one process, datasketch's in-memory MinHash LSH; commit 5f852b9) on two corpora
that model.synthetic_corpus generates from a seed without gettext catalogs: one with planted
defects (exact and near duplicates, blocked URLs, banned words, malformed lines), one without
near duplicates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from datatrove.pipeline.dedup.minhash import MinhashDedupSignature

import model.synthetic_corpus as synthetic_corpus
from model.corpus import ExecutorSettings, PrepareFailed, prepare_corpus
from model.corpus_config import Corpus, DedupSettings, load_corpus_config
from model.ingest import Document, read_source
from model.prepare.dedup import Spool, WordShingleSignature, minhash_config
from model.prepare.filtering import ReadAndFilter
from model.prepare.sampling import HELD_OUT_EVERY, weighted_sample
from model.prepare.tokenizer_stage import spooled
from model.shards import Manifest, read_tokens
from model.tokenizer import EOS_ID, load_tokenizer
from support import wait_for

GOLDEN = json.loads((Path(__file__).parent / "data" / "prepare-before-datatrove.json").read_text())


def digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def kept_texts(out: Path, manifest: Manifest) -> dict[str, list[str]]:
    """Each source's documents as its shards hold them (training, then held out), decoded."""
    tokenizer = load_tokenizer(out / "tokenizer")
    texts: dict[str, list[str]] = {}
    for shards in (manifest.shards, manifest.heldout):
        for source in dict.fromkeys(s.source for s in shards):
            stream = np.concatenate([read_tokens(out / s.file, s.dtype, 0, s.tokens) for s in shards if s.source == source])
            documents = np.split(stream, np.flatnonzero(stream == EOS_ID) + 1)[:-1]
            texts.setdefault(source, []).extend(tokenizer.decode(d[:-1].tolist()) for d in documents)
    return texts


def shingles(text: str, n: int = 5) -> set[str]:
    words = text.lower().split()
    return {" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}


def jaccard(a: str, b: str) -> float:
    first, second = shingles(a), shingles(b)
    return len(first & second) / len(first | second)


@pytest.fixture(scope="module")
def golden_corpora(tmp_path_factory) -> dict[str, Corpus]:
    """The golden answers' corpora, generated again (without catalogs, as when the answers were written)."""
    root = tmp_path_factory.mktemp("golden")
    patch = pytest.MonkeyPatch()
    patch.setattr(synthetic_corpus, "LOCALE_DIR", root / "no-catalogs")
    corpora = {name: load_corpus_config(synthetic_corpus.write_synthetic_corpus(
        root / name, answers["megabytes"], seed=7, defects=answers["defects"])) for name, answers in GOLDEN.items()}
    patch.undo()
    return corpora


def prepare_golden(corpus: Corpus, out: Path, tasks: int = 2):  # type: ignore[no-untyped-def]
    return prepare_corpus(corpus, out, vocab_size=600, shard_tokens=6000, chunk_bytes=4096,
                          executor=ExecutorSettings(tasks=tasks))


def test_without_near_duplicates_the_shards_are_byte_identical_to_the_in_memory_pipeline(golden_corpora, tmp_path):
    answers = GOLDEN["without-near-duplicates"]
    corpus = golden_corpora["without-near-duplicates"]
    manifest, report = prepare_golden(corpus, tmp_path / "data")
    assert [[s.shard_id, s.sha256, s.tokens, s.date_from, s.date_to, s.text_bytes] for s in manifest.shards] \
        == answers["shards"]
    assert [[s.shard_id, s.sha256, s.tokens] for s in manifest.heldout] == answers["heldout"]
    assert manifest.tokenizer_sha256 == answers["tokenizer_sha256"]
    produced = report.to_json()
    for key in ("fertility", "tokenizer", "heldout"):
        assert produced[key] == answers["report"][key]
    assert produced["sources"] == answers["report"]["sources"]  # exact duplicates, first seen kept, included


def test_with_defects_the_same_documents_are_kept_but_for_near_duplicates_at_the_lsh_edge(golden_corpora, tmp_path):
    answers = GOLDEN["with-defects"]
    corpus = golden_corpora["with-defects"]
    manifest, report = prepare_golden(corpus, tmp_path / "data")
    inputs = corpus.sources[0].paths[0].parent
    texts = {source.name: {digest(item.text): item.text for item in read_source(source) if isinstance(item, Document)}
             for source in corpus.sources}
    kept = {source: {digest(text) for text in documents} for source, documents in kept_texts(tmp_path / "data",
                                                                                               manifest).items()}
    differences = 0
    for source, before in answers["report"]["sources"].items():
        now = report.to_json()["sources"][source]
        # Every count but the near duplicates' is the same; bad records are named by file and line as before.
        assert [e.replace(f"{inputs}/", "") for e in now["bad_examples"]] == before["bad_examples"]
        assert {r: c for r, c in now["removed"].items() if r != "near_duplicate"} \
            == {r: c for r, c in before["removed"].items() if r != "near_duplicate"}
        assert now["records"] == before["records"] and now["bad_records"] == before["bad_records"]
        assert now["kept_documents"] == len(kept[source])
        # A document one pipeline kept and the other removed is a near duplicate one LSH found and the other
        # missed: it has a word 5-gram Jaccard similarity of at least 0.7 with a document both kept.
        old = set(answers["kept"][source])
        both = old & kept[source]
        for document in old ^ kept[source]:
            differences += 1
            assert max(jaccard(texts[source][document], texts[source][other]) for other in both) >= 0.7
    removed_before = sum(s["removed"].get("near_duplicate", {}).get("documents", 0)
                         for s in answers["report"]["sources"].values())
    assert differences <= removed_before // 10  # 1 of 19 near duplicates when this test was written


def test_duplicates_across_tasks_keep_the_document_seen_first(tmp_path: Path) -> None:
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghilmnoprstu") for _ in range(7)) for _ in range(500)]
    texts = [" ".join(rng.choice(words) for _ in range(200)) for _ in range(40)]
    near = texts[7].split()
    near[100] = "changé"
    far = texts[9].split()
    far[::2] = [rng.choice(words) for _ in far[::2]]  # half the words replaced
    later = ["  " + texts[3] + "\n", " ".join(near), " ".join(far),
             *(" ".join(rng.choice(words) for _ in range(200)) for _ in range(10))]
    corpus = _jsonl_corpus(tmp_path, {"a.jsonl": texts, "b.jsonl": later})  # two files: one per task
    manifest, report = prepare_corpus(corpus, tmp_path / "data", vocab_size=400, executor=ExecutorSettings(tasks=2))
    counts = report.sources["forum"]
    assert counts.removed == {"exact_duplicate": {"documents": 1, "chars": len(later[0])},
                              "near_duplicate": {"documents": 1, "chars": len(later[1])}}
    kept = kept_texts(tmp_path / "data", manifest)["forum"]
    assert sorted(kept) == sorted(texts + later[2:])  # the first of each pair, and the far variant

    off = dataclasses.replace(corpus, dedup=corpus.dedup.model_copy(update={"exact": False, "near_threshold": 0.0}))
    _, report = prepare_corpus(off, tmp_path / "all", vocab_size=400, executor=ExecutorSettings(tasks=2))
    assert report.sources["forum"].removed == {} and report.sources["forum"].kept_documents == len(texts + later)


def test_one_task_or_two_prepare_the_same_corpus(golden_corpora, tmp_path: Path) -> None:
    corpus = golden_corpora["with-defects"]
    one, report_one = prepare_golden(corpus, tmp_path / "one", tasks=1)
    three, report_three = prepare_golden(corpus, tmp_path / "three", tasks=3)
    assert report_one.to_json()["sources"] == report_three.to_json()["sources"]
    assert one.root_hash() == three.root_hash()


def test_a_failed_task_is_named_with_its_log_and_the_rerun_redoes_only_unfinished_tasks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = _jsonl_corpus(tmp_path, {"a.jsonl": [f"premier fichier, document numéro {n} ici" for n in range(30)],
                                      "b.jsonl": [f"second fichier, document numéro {n} ici" for n in range(30)]})
    runs = tmp_path / "runs.txt"  # each filter task appends its rank (tasks are forked processes)
    failing = tmp_path / "fail-once"
    failing.touch()
    real_run = ReadAndFilter.run

    def run_or_fail(self, data=None, rank=0, world_size=1):  # type: ignore[no-untyped-def]
        with open(runs, "a") as record:
            record.write(f"{rank}\n")
        if rank == 1 and failing.exists():  # the machine's disk filled up under task 1, once
            raise OSError(28, "No space left on device")
        return real_run(self, data, rank, world_size)

    monkeypatch.setattr(ReadAndFilter, "run", run_or_fail)
    out = tmp_path / "data"
    with pytest.raises(PrepareFailed) as failure:
        prepare_corpus(corpus, out, vocab_size=300, executor=ExecutorSettings(tasks=2))
    work = tmp_path / ".data.prepare"
    task_log = work / "logs" / "filter" / "logs" / "task_00001.log"
    message = str(failure.value)
    assert "stage 'filter'" in message and f"task 1 (log: {task_log}" in message and "No space left" in message
    assert "run the same command again to resume" in message and "task 0" not in message
    assert "No space left on device" in task_log.read_text() and not out.exists()
    assert sorted(runs.read_text().split()) == ["0", "1"]

    failing.unlink()
    steps: list[str] = []
    manifest, report = prepare_corpus(corpus, out, vocab_size=300, executor=ExecutorSettings(tasks=2), log=steps.append)
    assert sorted(runs.read_text().split()) == ["0", "1", "1"]  # task 0's work was kept, not redone
    assert steps[0].startswith("resuming in") and "filter: 2 tasks, 1 finished before" in steps
    assert report.sources["forum"].kept_documents == 60 and Manifest.load(out / "manifest.json") == manifest
    assert not work.exists()


def test_a_long_documents_signature_computed_in_blocks_is_datatroves(tmp_path: Path) -> None:
    signer = WordShingleSignature(str(tmp_path / "signatures"), minhash_config(DedupSettings()))
    rng = random.Random(3)
    words = [rng.choice(["le", "chat", "dort", "sur", "un", "tapis", "rouge", "bleu", "vert"]) for _ in range(9000)]
    shingles = signer.get_shingles(" ".join(words))
    assert len(shingles) > 4 * 2048  # several blocks
    assert signer.get_signature(shingles) == MinhashDedupSignature.get_signature(signer, shingles)


def test_the_sample_read_through_the_spool_indexes_is_the_one_reading_every_document_gives(tmp_path: Path) -> None:
    rng = random.Random(11)
    spools = []
    for number in range(3):  # three spools of one source, in corpus order
        spool = Spool(tmp_path / f"{number:05d}.jsonl")
        for _ in range(rng.randint(40, 400)):
            text = " ".join(rng.choice(["un", "deux", "trois", "quatre"]) for _ in range(rng.randint(1, 8)))
            spool.write(text, "2020-01-01", rng.getrandbits(64))
        spool.close()
        spools.append(spool.path)
    documents = list(spooled(spools))
    heldout = np.unique(np.asarray([key for _, _, key in rng.sample(documents, 30)], dtype=np.uint64))
    for rate in (0.05, 0.6, 2.3):  # the sparse spools are read by offset, the dense ones line by line
        draw = random.Random("seed")
        expected = [text for index, (text, _, key) in enumerate(documents)
                    if index % HELD_OUT_EVERY != HELD_OUT_EVERY - 1 and key not in set(heldout.tolist())
                    for _ in range(int(rate) + (draw.random() < rate - int(rate)))]
        assert list(weighted_sample(spools, rate, heldout, seed="seed")) == expected and expected


# A prepare whose encode tasks hang (each writes its process id first), to be interrupted there.
_HANGS_IN_ENCODE = r"""
import os, sys, time
from pathlib import Path
from model.corpus import ExecutorSettings, prepare_corpus
from model.corpus_config import load_corpus_config
from model.prepare.shards_stage import EncodeSpools

def hang(self, data=None, rank=0, world_size=1):
    Path(sys.argv[3], f"{rank}.pid").write_text(str(os.getpid()))
    time.sleep(600)

EncodeSpools.run = hang
prepare_corpus(load_corpus_config(sys.argv[1]), Path(sys.argv[2]), vocab_size=300, executor=ExecutorSettings(tasks=2))
"""


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.parametrize("ending", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_prepare_ends_its_task_processes_and_the_rerun_resumes(tmp_path: Path, ending) -> None:
    corpus = _jsonl_corpus(tmp_path, {"a.jsonl": [f"premier fichier, document numéro {n} ici" for n in range(30)],
                                      "b.jsonl": [f"second fichier, document numéro {n} ici" for n in range(30)]})
    out, pids = tmp_path / "data", tmp_path / "encoding"
    pids.mkdir()
    command = subprocess.Popen([sys.executable, "-c", _HANGS_IN_ENCODE, str(tmp_path / "corpus.toml"), str(out),
                                str(pids)], cwd=Path(__file__).parents[1], stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    encoding: list[int] = []
    try:
        tasks = wait_for(lambda: len(found := list(pids.glob("*.pid"))) == 2 and found, 120, "both encode tasks")
        encoding = [int(path.read_text()) for path in tasks]
        command.send_signal(ending)  # to the command alone, not its process group
        _, stderr = command.communicate(timeout=60)
        # Ctrl-C: Python's exit by the signal, after KeyboardInterrupt; SIGTERM: the status a shell gives it
        assert command.returncode == {signal.SIGINT: -signal.SIGINT, signal.SIGTERM: 128 + ending}[ending], stderr
        wait_for(lambda: not any(_running(pid) for pid in encoding), 10, "the encode tasks ended with the command")
    finally:
        command.kill()
        for pid in filter(_running, encoding):  # had they outlived it, they end here, with their process group
            with contextlib.suppress(OSError):
                if os.getpgid(pid) != os.getpgrp():
                    os.killpg(os.getpgid(pid), signal.SIGKILL)

    steps: list[str] = []
    manifest, report = prepare_corpus(corpus, out, vocab_size=300, executor=ExecutorSettings(tasks=2), log=steps.append)
    assert steps[0].startswith("resuming in") and "filter: 2 tasks, 2 finished before" in steps
    assert "tokenizer: 1 task, 1 finished before" in steps and "encode: 2 tasks" in steps
    assert report.sources["forum"].kept_documents == 60 and Manifest.load(out / "manifest.json") == manifest


def _jsonl_corpus(tmp_path: Path, files: dict[str, list[str]]) -> Corpus:
    directory = tmp_path / "forum"
    directory.mkdir()
    for name, texts in files.items():
        (directory / name).write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    config = tmp_path / "corpus.toml"
    config.write_text('[corpus]\nheldout_fraction = 0.0\n\n[[source]]\nname = "forum"\nlanguage = "fr"\n'
                      'licence = "CC0-1.0"\nweight = 1.0\ndate_from = 2020-01-01\ndate_to = 2020-12-31\n'
                      'paths = ["forum"]\n')
    return load_corpus_config(config)


def test_text_and_data_mining_opt_outs_are_removed_counted_and_stated_in_the_summaries(tmp_path: Path) -> None:
    from coordinator.card import _opt_outs_line, _preparation_summary
    from coordinator.training_summary import _processing
    from coordinator.training_summary_text import _processing_lines

    config = synthetic_corpus.write_synthetic_corpus(tmp_path / "in", megabytes=0.3, seed=5)
    reserved = config.with_name("tdm-reservations.txt")
    reserved.write_text("# rightsholders' reservations\nsite1.example\nsite2*.example/*\nsite3.example/nothing-here/*\n")
    config.write_text(config.read_text().replace('url_blocklist = ["blocked-domains.txt"]',
                                                 'url_blocklist = ["blocked-domains.txt"]\n'
                                                 'tdm_opt_outs = ["tdm-reservations.txt"]'))
    corpus = load_corpus_config(config)
    def is_reserved(url: str | None) -> bool:  # site1.example, and site2, site20-site29 and site200-site299
        host = urlsplit(url or "").hostname or ""
        return host == "site1.example" or host.startswith("site2")

    expected = {source.name: sum(1 for item in read_source(source) if isinstance(item, Document) and is_reserved(item.url))
                for source in corpus.sources}
    manifest, report = prepare_corpus(corpus, tmp_path / "data", vocab_size=400, executor=ExecutorSettings(tasks=2))
    assert sum(expected.values()) > 0
    for name, documents in expected.items():  # documents with a reserved URL, whatever else is wrong with them
        assert report.sources[name].removed.get("tdm_opt_out", {}).get("documents", 0) == documents
    listed = {"file": "tdm-reservations.txt", "entries": 3,
              "sha256": hashlib.sha256(reserved.read_bytes()).hexdigest()}
    assert report.tdm_opt_outs == {source.name: [listed] for source in corpus.sources}

    processing = _processing(tmp_path / "data", [s.name for s in corpus.sources])
    assert processing["tdm_reservations"]["removed_documents"] == sum(expected.values())
    assert "tdm_opt_out" not in processing["preparation_report"]["quality_filters"]
    section = "\n".join(_processing_lines(processing))
    assert f"removed {sum(expected.values()):,} documents whose URL matched a text-and-data-mining reservation" \
        in section and "tdm-reservations.txt (3 domains or URL patterns" in section
    preparation = _preparation_summary(json.loads((tmp_path / "data" / "prepare-report.json").read_text()))
    assert _opt_outs_line(preparation["tdm_opt_out_lists"], preparation["removed_documents"]).startswith(
        f"Text-and-data-mining reservations (opt-outs) honoured: {sum(expected.values()):,} documents removed")
