"""The `essaim` command as a user runs it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from essaim.processes import essaim_command

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(essaim_command(*args), capture_output=True, text=True, timeout=120)


def test_data_prepare_writes_shards_a_manifest_and_a_tokenizer(tmp_path: Path) -> None:
    result = run("data", "prepare", str(EXAMPLES / "corpus.toml"), "--out", str(tmp_path), "--vocab-size", "300")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["root_hash"][:16] in result.stdout
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()
    assert all((tmp_path / shard["file"]).is_file() for shard in manifest["shards"])


def test_data_prepare_refuses_a_source_without_licence(tmp_path: Path) -> None:
    text = tmp_path / "a.txt"
    text.write_text("bonjour")
    config = tmp_path / "corpus.toml"
    config.write_text(
        f'[[source]]\nname = "a"\nlanguage = "fr"\nweight = 1\ndate_from = 2020-01-01\ndate_to = 2020-12-31\n'
        f'paths = ["{text.name}"]\n'
    )
    result = run("data", "prepare", str(config), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "corpus.toml:1 (source #1 'a'): no licence" in result.stderr
    assert not (tmp_path / "out").exists()


def test_data_prepare_stops_at_a_malformed_line_when_told_to(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "bonjour tout le monde, voici un texte"}\n{"text": oops}\n')
    config = tmp_path / "corpus.toml"
    config.write_text(
        '[corpus]\non_bad_record = "stop"\n[[source]]\nname = "a"\nlanguage = "fr"\nlicence = "CC0-1.0"\n'
        'weight = 1\ndate_from = 2020-01-01\ndate_to = 2020-12-31\npaths = ["a.jsonl"]\n'
    )
    result = run("data", "prepare", str(config), "--out", str(tmp_path / "out"), "--vocab-size", "300")
    assert result.returncode == 2
    assert f"{tmp_path / 'a.jsonl'}:2: not valid JSON" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "corpus.toml"]


def test_coordinator_refuses_a_directory_without_a_corpus(tmp_path: Path) -> None:
    result = run("coordinator", "serve", "--data", str(tmp_path), "--port", "0")
    assert result.returncode == 2
    assert "manifest" in result.stderr and "essaim data prepare" in result.stderr


def test_a_finetune_site_with_missing_or_malformed_data_is_refused_before_it_joins(tmp_path: Path) -> None:
    site = ("finetune", "site", "--superlink", "127.0.0.1:9", "--name", "utility", "--checkpoint", str(tmp_path))
    missing = run(*site, "--data", str(tmp_path / "absent.jsonl"))
    assert missing.returncode == 2 and "absent.jsonl: no such file" in missing.stderr
    data = tmp_path / "private.jsonl"
    data.write_text('{"instruction": "q", "answer": "a"}\n{"instruction": "q"\n')
    malformed = run(*site, "--data", str(data))
    assert malformed.returncode == 2 and "private.jsonl:2: not valid JSON" in malformed.stderr
    data.write_text('{"instruction": "q", "answer": "a"}\n')
    no_checkpoint = run(*site, "--data", str(data))
    assert no_checkpoint.returncode == 2 and "unreadable checkpoint.json" in no_checkpoint.stderr


def test_a_finetune_run_refuses_bad_settings_and_a_used_output_directory(tmp_path: Path) -> None:
    no_checkpoint = run("finetune", "run", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "out"))
    assert no_checkpoint.returncode == 2 and "unreadable checkpoint.json" in no_checkpoint.stderr
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "finetune.json").write_text("{}")
    used = run("finetune", "run", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "used"))
    assert used.returncode == 2 and "already holds a fine-tune" in used.stderr
