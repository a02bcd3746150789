"""`essaim eval`: a checkpoint's loss and bits per byte on the held-out split, and clear refusals of bad input."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from essaim.cli import app
from model.checkpoints import write_checkpoint_files
from model.presets import build_model
from model.shards import Manifest
from model.tokenizer import load_tokenizer, train_tokenizer

SEQ_LEN = 16


def save_checkpoint(directory: Path, vocab_size: int, tokenizer, seed: int = 0) -> Path:  # type: ignore[no-untyped-def]
    directory.mkdir(parents=True)
    write_checkpoint_files(directory, build_model("tiny", vocab_size, seed), tokenizer, {
        "completed_round": 4, "next_round": 5, "run_id": "run", "lineage_head": 0, "config_version": "v",
        "run_config": {"seq_len": SEQ_LEN, "model_preset": "tiny"}, "saved_at": time.time()})
    return directory


@pytest.fixture(scope="module")
def checkpoints(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("checkpoints")
    vocab_size = Manifest.load(corpus_dir / "manifest.json").vocab_size
    save_checkpoint(root / "round-000004", vocab_size, load_tokenizer(corpus_dir / "tokenizer"))
    (root / "latest").write_text("round-000004")
    return root


def essaim(*args: object):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, [str(arg) for arg in args], env={"COLUMNS": "200"})  # a table's width


def test_eval_prints_loss_and_bits_per_byte_per_language_and_source(checkpoints: Path, corpus_dir: Path) -> None:
    manifest = Manifest.load(corpus_dir / "manifest.json")
    result = essaim("eval", checkpoints, "--data", corpus_dir, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (report["round"], report["seq_len"], report["corpus_root_hash"]) == (4, SEQ_LEN, manifest.root_hash())
    figures = {(f["group"], f["name"]): f for f in report["figures"]}
    evaluated = {s.source for s in manifest.heldout if sum(h.tokens for h in manifest.heldout if h.source == s.source)
                 >= SEQ_LEN}
    assert {name for group, name in figures if group == "source"} == evaluated
    languages = {s.language for s in manifest.heldout if s.source in evaluated}
    assert {name for group, name in figures if group == "language"} == languages
    overall = figures[("all", "all")]
    assert overall["tokens"] == sum(f["tokens"] for (group, _), f in figures.items() if group == "source")
    # An untrained model's loss is about ln(vocabulary size); its bits per byte follow from its tokens per byte.
    assert abs(overall["loss"] - 6.24) < 0.3  # ln 512 = 6.24
    assert overall["bits_per_byte"] == pytest.approx(overall["loss"] * overall["tokens"] / (overall["bytes"] * 0.693147),
                                                     rel=1e-5)
    table = essaim("eval", checkpoints / "round-000004", "--data", corpus_dir, "--max-tokens-per-source", SEQ_LEN)
    assert table.exit_code == 0, table.output
    assert "bits per byte" in table.output and all(f"│ {name} " in table.output for name in evaluated | languages)


def test_bad_input_is_refused_with_what_to_do(checkpoints: Path, corpus_dir: Path, tmp_path: Path) -> None:
    def refused(*args: object, reason: str) -> None:
        result = essaim("eval", *args)
        assert result.exit_code == 2 and reason in " ".join(result.output.split()), result.output

    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "--data", corpus_dir, reason="is not a checkpoint: it has neither checkpoint.json")
    refused(tmp_path / "missing", "--data", corpus_dir, reason="is not a directory")
    refused(checkpoints, "--data", tmp_path / "empty", reason="no corpus manifest at")

    old = tmp_path / "old-corpus"  # prepared before held-out splits existed
    shutil.copytree(corpus_dir, old, ignore=shutil.ignore_patterns("*.db*"))
    manifest = Manifest.load(old / "manifest.json")
    manifest.heldout = []
    manifest.save(old / "manifest.json")
    refused(checkpoints, "--data", old, reason="no held-out split (prepared before there was one")
    refused(checkpoints, "--data", old, reason="re-run `essaim data prepare`")

    other_tokenizer = train_tokenizer(["quelque chose d'autre"] * 20, 300, tmp_path / "tokenizer")
    save_checkpoint(tmp_path / "other-tokenizer", 512, other_tokenizer)
    refused(tmp_path / "other-tokenizer", "--data", corpus_dir, reason="was trained with another tokenizer")
    save_checkpoint(tmp_path / "small-vocabulary", 300, load_tokenizer(corpus_dir / "tokenizer"))
    refused(tmp_path / "small-vocabulary", "--data", corpus_dir, reason="has 300 token embeddings, fewer than")

    tampered = tmp_path / "tampered"
    shutil.copytree(checkpoints / "round-000004", tampered)
    info = json.loads((tampered / "checkpoint.json").read_text())
    (tampered / "checkpoint.json").write_text(json.dumps({**info, "params_digest": "0" * 64}))
    refused(tampered, "--data", corpus_dir, reason="do not match the digest recorded with them")
