"""After a real run, `essaim audit card` traces a checkpoint's tokens and `essaim audit verify` catches tampering."""

from __future__ import annotations

import json
import shutil
import time
import sqlite3
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select

from coordinator.store import LineageRecord, Shard, TokenRange, open_engine, session_factory, sqlite_url
from essaim.processes import essaim_command
from model.checkpoints import latest_checkpoint, read_checkpoint
from model.shards import Manifest
from protocol.certificates import certify
from protocol.identity import Identity
from support import logs, start_worker, wait_all

pytestmark = pytest.mark.e2e

ROUNDS = 3


def essaim(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(essaim_command(*args), capture_output=True, text=True, timeout=180)


def test_a_card_traces_a_checkpoint_and_verify_reports_each_kind_of_tampering(
    start_coordinator, tmp_path: Path, corpus_dir: Path
) -> None:
    # Two admitted labs; lab-0 certifies w0, while w1 types lab-1 without any certificate.
    labs = {f"lab-{i}": Ed25519PrivateKey.generate() for i in range(2)}
    lab_keys = {name: certify(name, key, b"\0" * 32, "institution", 0).institution_key for name, key in labs.items()}
    w0 = Identity.load_or_create(tmp_path / "w0.key")
    (tmp_path / "w0.cert").write_bytes(
        certify("lab-0", labs["lab-0"], w0.public_key, "institution", int(time.time()) + 3600).to_bytes())
    coordinator = start_coordinator(
        total_rounds=ROUNDS, target_group_size=2, inner_steps=8, batch_size=4, seq_len=64, matchmaking_seconds=5.0,
        heartbeat_seconds=1, checkpoint_every_rounds=1,
        extra=tuple(f"--admit-institution={name}={key}" for name, key in lab_keys.items()),
    )
    workers = [start_worker(coordinator, tmp_path, "w0", "--institution", "lab-0", "--certificate",
                            str(tmp_path / "w0.cert"), "--checkpoint-dir", str(tmp_path / "ckpt0")),
               start_worker(coordinator, tmp_path, "w1", "--institution", "lab-1",
                            "--checkpoint-dir", str(tmp_path / "ckpt1"))]
    wait_all(workers, timeout=240)
    assert [w.returncode for w in workers] == [0, 0], logs(tmp_path, "w0", "w1")
    assert "institution 'lab-1' not credited: it presented no certificate" in (tmp_path / "w1.log").read_text()
    database = coordinator.database_url
    checkpoint = latest_checkpoint(tmp_path / "ckpt0")
    middle = tmp_path / "ckpt0" / "round-000001"

    # The card of the round-1 checkpoint holds rounds 0 and 1 only, every token traced to a source and a worker.
    result = essaim("audit", "card", str(middle), "--data", str(corpus_dir), "--database", database,
                    "--out", str(tmp_path / "card"))
    assert result.returncode == 0, result.stderr
    card = json.loads((tmp_path / "card" / "model_card.json").read_text())
    with session_factory(open_engine(database))() as session:
        expected = session.scalar(select(func.sum(LineageRecord.end - LineageRecord.start)).where(LineageRecord.round <= 1))
    assert card["tokens"] == expected > 0
    assert sum(card["tokens_by_language"].values()) == sum(card["tokens_by_licence"].values()) == expected
    assert sum(s["tokens"] for s in card["sources"].values()) == expected
    # Only the verified institution is credited; the worker that merely typed lab-1 counts as a volunteer.
    assert {w["name"]: w["institution"] for w in card["workers"]} == {"w0": "lab-0", "w1": "independent"}
    assert set(card["institutions"]) == {"lab-0"} and card["institutions"]["lab-0"]["workers"] == 1
    assert card["volunteers"]["workers"] == 1
    assert card["institutions"]["lab-0"]["tokens"] + card["volunteers"]["tokens"] == expected
    assert card["checkpoint"]["completed_round"] == 1
    assert card["configs"]["run_config"]["inner_steps"] == 8 and card["configs"]["versions"] == ["genesis"]
    manifest = Manifest.load(corpus_dir / "manifest.json")
    assert {name: s["target_share"] for name, s in card["sources"].items()} == pytest.approx(
        {s.name: s.weight / sum(x.weight for x in manifest.sources) for s in manifest.sources if s.name in card["sources"]}
    )
    markdown = (tmp_path / "card" / "MODEL_CARD.md").read_text()
    assert "round 1" in markdown and "lab-0" in markdown and card["corpus"]["root_hash"] in markdown
    assert "| verified institution |" in markdown and "lab-1" not in markdown

    # An untouched run verifies.
    result = essaim("audit", "verify", "--data", str(corpus_dir), "--database", database, "--checkpoint", str(checkpoint))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no problem found" in result.stdout

    # Tampered copies: a shard's bytes, a lineage record for a range never leased, a lost range, a checkpoint's weights.
    data = tmp_path / "tampered-data"
    shutil.copytree(corpus_dir, data, ignore=shutil.ignore_patterns("coordinator.db*"))
    with sqlite3.connect(tmp_path / "coordinator.db") as live, sqlite3.connect(data / "coordinator.db") as copy:
        live.backup(copy)  # the live database keeps recent writes in its WAL file: copy through SQLite
    shard = manifest.shards[0]
    raw = bytearray((data / shard.file).read_bytes())
    raw[10] ^= 0xFF
    (data / shard.file).write_bytes(bytes(raw))
    sessions = session_factory(open_engine(sqlite_url(data / "coordinator.db")))
    with sessions.begin() as session:
        record = session.scalars(select(LineageRecord).order_by(LineageRecord.id)).first()
        forged_where = (record.id, record.shard_id, record.start + 1, record.end + 1)
        record.start, record.end = record.start + 1, record.end + 1
        pool = session.scalars(select(TokenRange).where(TokenRange.state == "pool")).first()
        lost = (pool.shard_id, pool.epoch, pool.start, pool.end)
        session.delete(pool)
        assert session.get(Shard, pool.shard_id) is not None
    forged_checkpoint = tmp_path / "forged-checkpoint"
    shutil.copytree(checkpoint, forged_checkpoint)
    info = json.loads((forged_checkpoint / "checkpoint.json").read_text())
    info["params_digest"] = "0" * 64
    (forged_checkpoint / "checkpoint.json").write_text(json.dumps(info))

    result = essaim("audit", "verify", "--data", str(data), "--checkpoint", str(forged_checkpoint))
    assert result.returncode == 1
    problems = [line for line in result.stdout.splitlines() if line.startswith("problem: ")]
    assert any(f"shard {shard.shard_id}: shard file" in p and "is corrupted" in p for p in problems), problems
    record_id, shard_id, start, end = forged_where
    assert any(f"lineage record {record_id} " in p and f"tokens {start}..{end}" in p and "never leased" in p
               for p in problems), problems
    assert any(f"shard {lost[0]} epoch {lost[1]}: tokens {lost[2]}..{lost[3]} are in no range" in p for p in problems), problems
    assert any(f"checkpoint {forged_checkpoint}" in p and "do not match the digest" in p for p in problems), problems
    assert read_checkpoint(checkpoint).completed_round == ROUNDS - 1
