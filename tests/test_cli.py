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


def test_rewind_refuses_a_directory_or_sqlite_url_without_a_database_and_creates_none(tmp_path: Path) -> None:
    default = run("coordinator", "rewind", "--data", str(tmp_path), "--to-round", "1")
    assert default.returncode == 2
    assert f"no database at {tmp_path / 'coordinator.db'}, and none was created" in default.stderr
    missing = tmp_path / "elsewhere.db"
    named = run("coordinator", "rewind", "--data", str(tmp_path), "--database", f"sqlite:///{missing}", "--to-round", "1")
    assert named.returncode == 2 and f"no database at {missing}" in named.stderr
    assert list(tmp_path.iterdir()) == []


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


def test_a_second_coordinator_on_a_busy_grpc_or_dht_port_is_refused(start_coordinator, corpus_dir: Path,
                                                                      tmp_path: Path) -> None:
    import socket

    first = start_coordinator()
    port = first.address.rsplit(":", 1)[1]
    second = run("coordinator", "serve", "--data", str(corpus_dir), "--database", f"sqlite:///{tmp_path / 'b.db'}",
                 "--port", port)
    assert second.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in second.stderr, second.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        dht_port = str(taken.getsockname()[1])
        third = run("coordinator", "serve", "--data", str(corpus_dir), "--database", f"sqlite:///{tmp_path / 'c.db'}",
                    "--port", "0", "--dht-port", dht_port)
    assert third.returncode == 2 and f"cannot listen on 127.0.0.1:{dht_port} for the hivemind peer" in third.stderr


def test_plaintext_off_loopback_is_refused_unless_asked_for_by_name(corpus_dir: Path, tmp_path: Path) -> None:
    served = run("coordinator", "serve", "--data", str(corpus_dir), "--database", f"sqlite:///{tmp_path / 'a.db'}",
                 "--host", "0.0.0.0", "--port", "0")
    assert served.returncode == 2 and "--tls-cert" in served.stderr and "--insecure" in served.stderr
    joined = run("worker", "join", "--coordinator", "10.213.200.1:50051", "--identity", str(tmp_path / "w.key"))
    assert joined.returncode == 2 and "--coordinator-fingerprint" in joined.stderr and "--insecure" in joined.stderr
    site = run("finetune", "site", "--superlink", "10.213.200.1:9093", "--name", "a", "--data", str(tmp_path / "x"),
               "--checkpoint", str(tmp_path / "y"))
    assert site.returncode == 2 and "--ca-cert" in site.stderr and "--insecure" in site.stderr


def test_an_institution_certifies_the_key_a_worker_prints_and_the_certificate_is_its_to_present(tmp_path: Path) -> None:
    from protocol.certificates import check, parse

    worker = run("worker", "id", "--identity", str(tmp_path / "worker.key"))
    assert worker.returncode == 0 and "worker id " in worker.stderr
    worker_key = worker.stdout.strip()
    assert run("worker", "id", "--identity", str(tmp_path / "worker.key")).stdout.strip() == worker_key  # stable
    institution_key = run("institution", "keygen", str(tmp_path / "genci.key")).stdout.strip()
    assert run("institution", "keygen", str(tmp_path / "genci.key")).returncode == 2  # never overwritten

    made = run("institution", "certify", worker_key, "--key", str(tmp_path / "genci.key"), "--institution", "GENCI",
               "--class", "hpc", "--days", "3", "--out", str(tmp_path / "worker.cert"))
    assert made.returncode == 0, made.stderr
    certificate = parse((tmp_path / "worker.cert").read_bytes())
    assert (certificate.institution, certificate.trust_class, certificate.institution_key) == (
        "GENCI", "hpc", institution_key)
    check(certificate, bytes.fromhex(worker_key), {"GENCI": institution_key}, now=0.0)

    not_hex = run("institution", "certify", "zz", "--key", str(tmp_path / "genci.key"), "--institution", "GENCI",
                  "--out", str(tmp_path / "x.cert"))
    assert not_hex.returncode == 2 and "the 64 hex digits `essaim worker id` prints" in not_hex.stderr
    volunteer = run("institution", "certify", worker_key, "--key", str(tmp_path / "genci.key"), "--institution",
                    "GENCI", "--class", "volunteer", "--out", str(tmp_path / "x.cert"))
    assert volunteer.returncode == 2 and "grants one of hpc, institution" in volunteer.stderr
    assert not (tmp_path / "x.cert").exists()


def test_a_coordinator_refuses_an_institution_without_a_key_or_admitted_beside_a_ledger(tmp_path: Path) -> None:
    bad_key = run("coordinator", "serve", "--data", str(tmp_path), "--admit-institution", "GENCI=not-a-key")
    assert bad_key.returncode == 2 and "its key must be the 64 hex digits" in bad_key.stderr
    no_key = run("coordinator", "serve", "--data", str(tmp_path), "--admit-institution", "GENCI")
    assert no_key.returncode == 2 and "expected NAME=PUBLIC_KEY" in no_key.stderr
    governed = run("coordinator", "serve", "--data", str(tmp_path), "--governance", str(tmp_path / "ledger.json"),
                   "--admit-institution", f"GENCI={'ab' * 32}")
    assert governed.returncode == 2 and "a governed run admits institutions by vote" in governed.stderr
