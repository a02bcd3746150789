"""Corpus preparation: sample corpus -> tokenizer + verified shards with provenance."""

import numpy as np
import pytest

import model.sample_corpus as sample_corpus
from model.corpus import load_corpus_config, prepare_corpus
from model.shards import Manifest, read_tokens, verify_shard
from model.tokenizer import EOS_ID, load_tokenizer, tokenizer_sha256

SHARD_TOKENS = 4000


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    sources = load_corpus_config(sample_corpus.write_sample_corpus(root / "text", 20_000))
    out = root / "prepared"
    manifest = prepare_corpus(sources, out, vocab_size=1000, shard_tokens=SHARD_TOKENS)
    return sources, out, manifest


def test_sample_corpus_gives_french_english_and_code_with_provenance(prepared):
    sources, _, manifest = prepared
    assert {s.language for s in manifest.shards} == {"fr", "en", "code"}
    for source in sources:
        assert source.licence and source.language
        assert sum(len(p.read_text(encoding="utf-8")) for p in source.paths) <= 20_000
    code = next(s for s in sources if s.language == "code")
    assert code.licence == "PSF-2.0"


def test_every_shard_verifies_against_the_manifest_on_disk(prepared):
    _, out, manifest = prepared
    assert Manifest.load(out / "manifest.json") == manifest
    assert manifest.tokenizer_sha256 == tokenizer_sha256(out / "tokenizer")
    for shard in manifest.shards:
        assert 0 < shard.tokens <= SHARD_TOKENS
        assert shard.dtype == "uint16"
        verify_shard(out / shard.file, shard.sha256, shard.tokens, shard.dtype)


def test_shards_hold_exactly_the_tokenized_documents_of_one_source(prepared):
    sources, out, manifest = prepared
    tokenizer = load_tokenizer(out / "tokenizer")
    assert len(tokenizer) <= manifest.vocab_size
    for source in sources:
        expected = []
        for path in source.paths:
            expected += tokenizer.encode(path.read_text(encoding="utf-8"), add_special_tokens=False)
            expected.append(EOS_ID)
        shards = sorted(
            (s for s in manifest.shards if s.source == source.name), key=lambda s: s.shard_id
        )
        assert all(s.language == source.language and s.licence == source.licence for s in shards)
        assert sum(s.tokens for s in shards) == len(expected)
        stored = np.concatenate([read_tokens(out / s.file, s.dtype, 0, s.tokens) for s in shards])
        np.testing.assert_array_equal(stored, expected)


def test_sample_corpus_is_deterministic(tmp_path):
    first = sample_corpus.write_sample_corpus(tmp_path / "a", 5_000)
    second = sample_corpus.write_sample_corpus(tmp_path / "b", 5_000)
    assert first.read_text() == second.read_text()
    for a, b in zip(load_corpus_config(first), load_corpus_config(second)):
        assert [p.read_bytes() for p in a.paths] == [p.read_bytes() for p in b.paths]


def test_without_gettext_catalogs_generated_cc0_text_stands_in(tmp_path, monkeypatch):
    monkeypatch.setattr(sample_corpus, "LOCALE_DIR", tmp_path / "no-locale")
    sources = load_corpus_config(sample_corpus.write_sample_corpus(tmp_path, 30_000))
    by_language = {s.language: s for s in sources}
    assert set(by_language) == {"fr", "en", "code"}
    french = by_language["fr"]
    assert (french.name, french.licence) == ("essaim-generated-fr", "CC0-1.0")
    text = "".join(p.read_text(encoding="utf-8") for p in french.paths)
    assert 29_000 <= len(text) <= 30_000
    assert "é" in text


VALID = '[[source]]\nname = "w"\nlanguage = "fr"\nlicence = "CC0-1.0"\npaths = ["a.txt"]\n'


def _write_config(tmp_path, body: str):
    (tmp_path / "a.txt").write_text("du texte\n", encoding="utf-8")
    config = tmp_path / "corpus.toml"
    config.write_text(body, encoding="utf-8")
    return config


def test_source_without_licence_is_rejected_naming_the_source(tmp_path):
    config = _write_config(
        tmp_path, '[[source]]\nname = "wiki-fr"\nlanguage = "fr"\npaths = ["a.txt"]\n'
    )
    with pytest.raises(ValueError, match=r"'wiki-fr'.* has no licence: add licence = "):
        load_corpus_config(config)


def test_american_spelling_of_licence_gets_a_hint(tmp_path):
    config = _write_config(tmp_path, VALID.replace("licence", "license"))
    with pytest.raises(ValueError, match="spelled 'licence'"):
        load_corpus_config(config)


def test_missing_text_file_and_duplicate_names_are_rejected(tmp_path):
    source = VALID.replace("a.txt", "{}")
    with pytest.raises(ValueError, match=r"'w'.*gone\.txt does not exist"):
        load_corpus_config(_write_config(tmp_path, source.format("gone.txt")))
    with pytest.raises(ValueError, match="two sources are named 'w'"):
        load_corpus_config(_write_config(tmp_path, source.format("a.txt") * 2))


def test_config_paths_are_relative_to_the_config_file(tmp_path):
    config = _write_config(tmp_path, VALID)
    [source] = load_corpus_config(config)
    assert source.paths == [tmp_path / "a.txt"]
