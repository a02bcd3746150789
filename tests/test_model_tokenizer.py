"""Tokenizer: trained offline, loadable by transformers, exact byte-level round trips."""

import random

import pytest
import transformers

import model.tokenizer as tokenizer_module
from model.tokenizer import (
    SPECIAL_TOKENS,
    load_tokenizer,
    pretoken_pieces,
    tokenizer_sha256,
    train_tokenizer,
)

TEXTS = [
    "Bonjour à tous, le modèle apprend le français et l'anglais.",
    "Hello everyone, the model learns French and English.",
    "Où est la bibliothèque ? Elle est fermée le dimanche.",
    "Where is the library? It is closed on Sundays.",
] * 25


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(iter(TEXTS), vocab_size=400, out_dir=out)
    return out


def test_saved_tokenizer_loads_with_autotokenizer_offline(tokenizer_dir):
    assert (tokenizer_dir / "tokenizer.json").is_file()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    assert 260 <= len(tokenizer) <= 400


def test_accents_punctuation_and_emoji_round_trip_exactly(tokenizer_dir):
    text = "Bonjour, ça va ? é à ü 🙂"
    for tokenizer in (
        load_tokenizer(tokenizer_dir),
        transformers.AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True),
    ):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text


def test_special_tokens_have_fixed_ids(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    assert tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS) == [0, 1, 2, 3]
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == (
        "<pad>", "<s>", "</s>", "<unk>",
    )


def test_training_learns_merges_from_the_text(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    # "bibliothèque" is 13 bytes; a tokenizer trained on it needs far fewer tokens.
    assert len(tokenizer.encode("bibliothèque", add_special_tokens=False)) < 6


def test_tokenizer_hash_is_stable_and_tracks_content(tokenizer_dir, tmp_path):
    first = tokenizer_sha256(tokenizer_dir)
    assert first == tokenizer_sha256(tokenizer_dir)
    train_tokenizer(iter(TEXTS[:2]), vocab_size=300, out_dir=tmp_path)
    assert tokenizer_sha256(tmp_path) != first


def test_load_from_a_directory_without_tokenizer_json_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_too_small_vocabulary_is_refused(tmp_path):
    with pytest.raises(ValueError, match="at least 260"):
        train_tokenizer(iter(TEXTS), vocab_size=100, out_dir=tmp_path)


def test_a_long_text_trains_the_same_tokenizer_in_pieces_as_whole(tmp_path, monkeypatch):
    rng = random.Random(5)
    words = ["".join(rng.choice("abcdéfghijklmnoprstuvz") for _ in range(rng.randint(1, 9))) for _ in range(400)]
    lines = [("    " * rng.randint(0, 2)) + " ".join(rng.choices(words, k=rng.randint(2, 12))) for _ in range(6000)]
    text = "\n".join(lines) + "\n\n" + ":" * 50  # indentation, a blank line, a punctuation run
    assert len(list(pretoken_pieces(text))) > 2
    train_tokenizer([text], vocab_size=600, out_dir=tmp_path / "in-pieces")
    monkeypatch.setattr(tokenizer_module, "pretoken_pieces", lambda text: iter([text]))
    train_tokenizer([text], vocab_size=600, out_dir=tmp_path / "whole")
    assert tokenizer_sha256(tmp_path / "in-pieces") == tokenizer_sha256(tmp_path / "whole")
