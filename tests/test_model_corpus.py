"""`data prepare` end to end: filtered, deduplicated, dated shards, a report, and nothing half-written."""

import json
from pathlib import Path

import numpy as np
import pytest

import model.sample_corpus as sample_corpus
from model.corpus import REPORT_FILE, PrepareStopped, prepare_corpus
from model.corpus_config import load_corpus_config
from model.shards import Manifest, read_tokens, verify_shard
from model.synthetic_corpus import write_synthetic_corpus
from model.tokenizer import EOS_ID, load_tokenizer, tokenizer_sha256

SHARD_TOKENS = 4000


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    corpus = load_corpus_config(sample_corpus.write_sample_corpus(root / "text", 20_000))
    manifest, report = prepare_corpus(corpus, root / "data", vocab_size=1000, shard_tokens=SHARD_TOKENS)
    return corpus, root / "data", manifest, report


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    corpus = load_corpus_config(write_synthetic_corpus(root / "in", megabytes=1.5))
    manifest, report = prepare_corpus(corpus, root / "data", vocab_size=2000, shard_tokens=20_000)
    return corpus, root / "data", manifest, report


def test_every_shard_verifies_against_the_manifest_on_disk(sample) -> None:
    corpus, out, manifest, _ = sample
    assert Manifest.load(out / "manifest.json") == manifest
    assert manifest.tokenizer_sha256 == tokenizer_sha256(out / "tokenizer")
    assert [(s.name, s.weight) for s in manifest.sources] == [(s.name, s.weight) for s in corpus.sources]
    assert {s.language for s in manifest.shards} == {"fr", "en", "code"}
    for shard in manifest.shards:
        assert 0 < shard.tokens <= SHARD_TOKENS
        verify_shard(out / shard.file, shard.sha256, shard.tokens, shard.dtype)


def test_shards_hold_exactly_the_kept_documents_of_one_source(sample) -> None:
    corpus, out, manifest, report = sample
    tokenizer = load_tokenizer(out / "tokenizer")
    for source in corpus.sources:
        texts = {p.read_text(encoding="utf-8") for p in source.paths}
        shards = sorted((s for s in manifest.shards if s.source == source.name), key=lambda s: s.shard_id)
        assert all(s.language == source.language and s.licence == source.licence for s in shards)
        stored = np.concatenate([read_tokens(out / s.file, s.dtype, 0, s.tokens) for s in shards])
        assert stored[-1] == EOS_ID
        documents = np.split(stored, np.flatnonzero(stored == EOS_ID)[:-1] + 1)
        assert len(documents) == report.sources[source.name].kept_documents
        for document in documents:
            assert tokenizer.decode(document[:-1].tolist()) in texts
        assert sum(s.tokens for s in shards) == report.sources[source.name].tokens


def test_the_report_counts_every_planted_defect_with_its_file_and_line(synthetic) -> None:
    corpus, out, _, report = synthetic
    assert json.loads((out / REPORT_FILE).read_text()) == report.to_json()
    english = report.sources["synthetic-en"]
    path = next(s for s in corpus.sources if s.name == "synthetic-en").paths[0]
    assert english.bad_examples == [
        f"{path}:5: not valid JSON (Unterminated string starting at at column 10)",
        f"{path}:6: no text: field 'text' is missing",
    ]
    removed = {reason for counts in report.sources.values() for reason in counts.removed}
    assert {"blocked_url", "too_short", "banned_words", "exact_duplicate", "near_duplicate"} <= removed
    for counts in report.sources.values():
        assert counts.records == counts.kept_documents + sum(r["documents"] for r in counts.removed.values())


def test_shards_go_oldest_first_and_never_mix_years(synthetic) -> None:
    _, _, manifest, _ = synthetic
    for source in {s.source for s in manifest.shards}:
        shards = sorted((s for s in manifest.shards if s.source == source), key=lambda s: s.shard_id)
        assert [s.date_from[:4] for s in shards] == sorted(s.date_from[:4] for s in shards)  # by year bucket
        assert all(s.date_from[:4] == s.date_to[:4] for s in shards)
    dated = [s for s in manifest.shards if s.source == "synthetic-fr"]
    assert len({s.date_from[:4] for s in dated}) >= 5


def test_the_mixture_tokenizer_needs_fewer_tokens_than_an_english_one_outside_english(synthetic) -> None:
    _, _, _, report = synthetic
    for language in ("fr", "de", "es", "it"):
        figures = report.fertility[language]
        assert figures["held_out"] and figures["tokens_per_word"] < figures["english_only_tokens_per_word"]
    assert report.fertility["en"]["english_only_tokens_per_word"] < report.fertility["en"]["tokens_per_word"]


def test_a_bad_record_with_stop_leaves_the_previous_preparation_untouched(synthetic, tmp_path: Path) -> None:
    corpus, _, _, _ = synthetic
    out = tmp_path / "data"
    first, _ = prepare_corpus(corpus, out, vocab_size=500, shard_tokens=50_000)
    stopping = load_corpus_config(Path(corpus.sources[0].paths[0]).parent / "corpus.toml")
    stopping.settings.on_bad_record = "stop"
    with pytest.raises(PrepareStopped, match=r"synthetic-(en|fr)\.jsonl:5: not valid JSON .* nothing was written"):
        prepare_corpus(stopping, out, vocab_size=500, shard_tokens=50_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no staging directory left behind
    assert Manifest.load(out / "manifest.json") == first
    for shard in first.shards:
        verify_shard(out / shard.file, shard.sha256, shard.tokens, shard.dtype)


def test_an_output_directory_that_is_not_a_corpus_is_refused(sample, tmp_path: Path) -> None:
    corpus = sample[0]
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no prepared corpus"):
        prepare_corpus(corpus, tmp_path)
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "coordinator.db").write_text("")
    with pytest.raises(ValueError, match="holds a run's database"):
        prepare_corpus(corpus, tmp_path)


def test_sample_corpus_is_deterministic(tmp_path: Path) -> None:
    first = sample_corpus.write_sample_corpus(tmp_path / "a", 5_000)
    second = sample_corpus.write_sample_corpus(tmp_path / "b", 5_000)
    assert first.read_text() == second.read_text()
    for a, b in zip(load_corpus_config(first).sources, load_corpus_config(second).sources):
        assert [p.read_bytes() for p in a.paths] == [p.read_bytes() for p in b.paths]


def test_without_gettext_catalogs_generated_cc0_text_stands_in(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sample_corpus, "LOCALE_DIR", tmp_path / "no-locale")
    sources = load_corpus_config(sample_corpus.write_sample_corpus(tmp_path, 30_000)).sources
    by_language = {s.language: s for s in sources}
    assert set(by_language) == {"fr", "en", "code"}
    french = by_language["fr"]
    assert (french.name, french.licence) == ("essaim-generated-fr", "CC0-1.0")
    text = "".join(p.read_text(encoding="utf-8") for p in french.paths)
    assert 29_000 <= len(text) <= 30_000
    assert "é" in text


def test_a_long_document_encodes_piece_by_piece_exactly_as_whole(sample) -> None:
    import json as json_module

    from model.prepare.shards_stage import pieces as cut

    _, out, _, _ = sample
    encoder = load_tokenizer(out / "tokenizer").backend_tokenizer
    text = Path(json_module.__file__).parent.joinpath("decoder.py").read_text() * 40  # ~400k characters of code
    pieces = list(cut(iter([(text, None)])))
    assert len(pieces) > 3 and [end for _, _, end in pieces] == [False] * (len(pieces) - 1) + [True]
    assert "".join(p for p, _, _ in pieces) == text
    whole = encoder.encode(text, add_special_tokens=False).ids
    assert [i for p, _, _ in pieces for i in encoder.encode(p, add_special_tokens=False).ids] == whole
