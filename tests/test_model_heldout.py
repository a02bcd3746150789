"""The held-out split: set aside by the documents' text at `data prepare`, named by the root hash, never leased."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from coordinator.scheduler import Scheduler
from coordinator.store import Shard, TokenRange, Worker, load_manifest, open_engine, session_factory, sqlite_url
from model.corpus import prepare_corpus
from model.corpus_config import load_corpus_config
from model.heldout import choose_heldout, document_key, held_out, heldout_count
from model.prepare.sampling import lowest_first
from model.sample_corpus import write_sample_corpus
from model.shards import Manifest, ShardInfo, SourceInfo, read_tokens, verify_shard
from model.tokenizer import EOS_ID, load_tokenizer


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory):
    """The same documents prepared twice (a handful of documents per source)."""
    root = tmp_path_factory.mktemp("heldout")
    corpus = load_corpus_config(write_sample_corpus(root / "text", chars_per_language=40_000))
    first = prepare_corpus(corpus, root / "a", vocab_size=400, shard_tokens=4096)
    second = prepare_corpus(corpus, root / "b", vocab_size=400, shard_tokens=4096)
    return corpus, root, first, second


def documents(out: Path, shards: list[ShardInfo]) -> list[np.ndarray]:
    """The documents of shards (read in shard order), each without its end-of-document token."""
    if not shards:
        return []
    stored = np.concatenate([read_tokens(out / s.file, s.dtype, 0, s.tokens) for s in sorted(shards, key=lambda s: s.shard_id)])
    assert stored[-1] == EOS_ID
    return [d[:-1] for d in np.split(stored, np.flatnonzero(stored == EOS_ID)[:-1] + 1)]


def test_each_source_holds_out_whole_documents_chosen_by_their_text_the_same_each_time(prepared) -> None:
    corpus, root, (manifest, report), (again, _) = prepared
    assert again.root_hash() == manifest.root_hash() and again.heldout == manifest.heldout  # same documents out
    tokenizer = load_tokenizer(root / "a" / "tokenizer")
    for source in corpus.sources:
        held = [s for s in manifest.heldout if s.source == source.name]
        trained = [s for s in manifest.shards if s.source == source.name]
        assert held and all(s.shard_id.startswith("_heldout-") and (s.language, s.licence) == (source.language,
                                                                                               source.licence)
                            for s in held)
        for shard in held:
            verify_shard(root / "a" / shard.file, shard.sha256, shard.tokens, shard.dtype)
        held_texts = [tokenizer.decode(d.tolist()) for d in documents(root / "a", held)]
        trained_texts = [tokenizer.decode(d.tolist()) for d in documents(root / "a", trained)]
        counts = report.sources[source.name]
        assert set(held_texts) | set(trained_texts) <= {p.read_text(encoding="utf-8") for p in source.paths}
        # Training keeps most documents, and a held-out document is never also trained on.
        expected = heldout_count(counts.kept_documents, corpus.settings.heldout_fraction,
                                 corpus.settings.heldout_min_documents)
        assert 1 <= len(held_texts) == report.heldout[source.name]["documents"] <= expected
        assert len(trained_texts) + len(held_texts) == counts.kept_documents
        assert not set(held_texts) & set(trained_texts)
        assert sum(s.tokens for s in trained) == counts.tokens > 3 * report.heldout[source.name]["tokens"]
        # Each shard's text_bytes are the UTF-8 bytes its documents' text takes.
        for shards, texts in ((held, held_texts), (trained, trained_texts)):
            assert sum(s.text_bytes for s in shards) == sum(len(t.encode("utf-8")) for t in texts)
    saved = json.loads((root / "a" / "prepare-report.json").read_text())
    assert saved["heldout"] == report.heldout


@pytest.mark.parametrize("documents,fraction,minimum,expected", [
    (0, 0.01, 3, 0), (3, 0.01, 3, 0), (5, 0.01, 3, 1), (12, 0.01, 3, 3), (1000, 0.01, 3, 10), (1000, 0.0, 3, 0),
])
def test_held_out_counts(documents: int, fraction: float, minimum: int, expected: int) -> None:
    assert heldout_count(documents, fraction, minimum) == expected


def draw(texts: list[str], fraction: float, minimum: int) -> set[int]:
    """The held-out keys of ``texts``, every (key, chars) sorted in memory."""
    pairs = sorted((document_key(text), len(text)) for text in texts)
    return set(choose_heldout(pairs, len(texts), sum(map(len, texts)), fraction, minimum).tolist())


def test_the_draw_depends_on_the_texts_not_their_order_and_keeps_big_documents_for_training() -> None:
    texts = ["x" * 1000, *(f"document {n}" for n in range(7))]
    keys = {text: document_key(text) for text in texts}
    chosen = draw(texts, 0.01, 3)
    assert chosen == draw(texts[::-1], 0.01, 3)
    # Two of eight documents (a quarter), the lowest keys among those that fit a quarter of the text.
    small = sorted(keys[t] for t in texts[1:])
    assert chosen == set(small[:2]) and keys[texts[0]] not in chosen
    assert draw(texts, 0.0, 3) == set()


def test_the_draw_merged_from_the_tasks_sorted_key_files_is_the_draw_of_all_documents(tmp_path: Path) -> None:
    texts = [f"document {n} " + "x" * (n % 17) * 40 for n in range(3000)]
    files = []
    for task, part in enumerate((texts[:1000], texts[1000:1001], [], texts[1001:])):  # one task kept nothing
        pairs = np.asarray([(document_key(t), len(t)) for t in part], dtype=np.uint64).reshape(-1, 2)
        files.append(tmp_path / f"{task:05d}.npy")
        np.save(files[-1], pairs[np.argsort(pairs[:, 0], kind="stable")])
    for fraction, minimum in ((0.01, 3), (0.2, 3), (0.0, 3)):
        merged = choose_heldout(lowest_first(files), len(texts), sum(map(len, texts)), fraction, minimum)
        assert set(merged.tolist()) == draw(texts, fraction, minimum)
        assert len(merged) <= heldout_count(len(texts), fraction, minimum) and (len(merged) > 0) == (fraction > 0)
        assert held_out(merged, np.asarray([document_key(t) for t in texts], dtype=np.uint64)).sum() == len(merged)


def test_no_split_when_the_fraction_is_zero(prepared, tmp_path: Path) -> None:
    corpus = prepared[0]
    corpus = dataclasses.replace(corpus, settings=corpus.settings.model_copy(update={"heldout_fraction": 0.0}))
    manifest, report = prepare_corpus(corpus, tmp_path / "out", vocab_size=400, shard_tokens=4096)
    assert manifest.heldout == [] and all(r["documents"] == 0 for r in report.heldout.values())
    assert sum(s.tokens for s in manifest.shards) > sum(s.tokens for s in prepared[2][0].shards)


SOURCES = [SourceInfo("wiki-fr", "fr", "CC-BY-SA-4.0", 32.4, "2021-01-01", "2021-12-31")]


def _shard(shard_id: str, chunks: tuple[str, ...] = (), text_bytes: int = 0) -> ShardInfo:
    return ShardInfo(shard_id, f"{shard_id}.bin", "0" * 64, 10, "uint16", "fr", "wiki-fr", "CC-BY-SA-4.0",
                     "2021-01-01", "2021-06-30", chunks, text_bytes)


def test_a_manifest_without_held_out_shards_or_text_bytes_hashes_as_before() -> None:
    # Root hashes computed by Essaim before held-out splits and text bytes existed (commit c82e7ff):
    # runs named by them stay valid.
    assert Manifest(4096, "ab" * 32, SOURCES, [_shard("a-00000")]).root_hash() == (
        "64efbb8385d298cbe1d6b1336b138916ea3e43cd67d8a2ff5f0695ad083b0c0a")
    assert Manifest(4096, "ab" * 32, SOURCES, [_shard("a-00000", ("1" * 64,))], chunk_bytes=256).root_hash() == (
        "fd9b88acafc91d01c3c06e1ea77c45f3adaa82886b83ddd801bb0f8c74f5a035")


def test_the_root_hash_covers_the_held_out_shards(tmp_path: Path) -> None:
    base = Manifest(4096, "ab" * 32, SOURCES, [_shard("a-00000", text_bytes=20)], heldout=[_shard("_heldout-a-00000")])
    without = dataclasses.replace(base, heldout=[])
    other = dataclasses.replace(base, heldout=[dataclasses.replace(base.heldout[0], sha256="1" * 64)])
    fewer_bytes = dataclasses.replace(base, heldout=[dataclasses.replace(base.heldout[0], text_bytes=19)])
    assert len({m.root_hash() for m in (base, without, other, fewer_bytes)}) == 4
    path = tmp_path / "manifest.json"
    base.save(path)
    assert Manifest.load(path) == base
    document = json.loads(path.read_text())
    document["heldout"][0]["tokens"] = 99
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match="edited after it was written"):
        Manifest.load(path)
    twice = dataclasses.replace(base, heldout=[dataclasses.replace(base.heldout[0], shard_id="a-00000")])
    twice.save(path)
    with pytest.raises(ValueError, match="lists a shard id twice"):
        Manifest.load(path)


def test_held_out_shards_are_never_leased(corpus_dir: Path, tmp_path: Path) -> None:
    manifest = Manifest.load(corpus_dir / "manifest.json")
    training = {s.shard_id for s in manifest.shards}
    assert manifest.heldout and not training & {s.shard_id for s in manifest.heldout}
    sessions = session_factory(open_engine(sqlite_url(tmp_path / "coordinator.db")))
    load_manifest(sessions, manifest)
    with sessions.begin() as session:
        session.add(Worker(id="w", public_key=b"k" * 32, name="w", institution="lab", device="cpu",
                           registered_at=0.0, last_seen=0.0))
    with sessions() as session:
        assert set(session.scalars(select(Shard.id))) == training
        pool = session.scalars(select(TokenRange)).all()
        assert {r.shard_id for r in pool} == training
        assert sum(r.end - r.start for r in pool) == sum(s.tokens for s in manifest.shards)
    scheduler = Scheduler(sessions, lease_seconds=60, total_rounds=100)
    epoch = sum(s.tokens for s in manifest.shards)
    leased = [scheduler.acquire("w", 4096, 0).lease for _ in range(epoch // 4096 + len(manifest.shards) + 5)]
    assert max(lease.epoch for lease in leased) >= 1  # past a first epoch: the pool was leased through
    assert {lease.shard_id for lease in leased} == training  # every training shard, and nothing else
