"""A whole run stopped (cleanly, or by a crash) and resumed from its workers' checkpoints."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from sqlalchemy import func, select

from coordinator.accounting import accounting_problems
from coordinator.store import LineageRecord
from essaim.processes import essaim_command, kill_group, stop_group
from model.checkpoints import latest_checkpoint, load_model, read_checkpoint
from model.evaluate import mean_loss
from model.presets import build_model
from model.shards import Manifest, read_tokens
from support import contributions_by_round, logs, start_worker, wait_all, wait_for

pytestmark = pytest.mark.e2e

ROUNDS = 6
RUN = dict(
    total_rounds=ROUNDS, target_group_size=2, inner_steps=20, batch_size=4, seq_len=64, inner_lr=0.005,
    matchmaking_seconds=2.0, averaging_timeout_seconds=15.0, lease_seconds=5, heartbeat_seconds=1,
    compression="fp16", checkpoint_every_rounds=2,
)
NAMES = ["w0", "w1"]
# The same run with each round averaged while the next trains (no spot checks: nobody could replay one).
OVERLAPPED = dict(RUN, overlap_averaging=True, verify_fraction=0.0)


@pytest.fixture
def socket_dir() -> Path:
    """hivemind's sockets, in a directory the test removes: killed workers cannot."""
    path = Path(tempfile.mkdtemp(prefix="ess-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start_workers(coordinator, tmp_path: Path, socket_dir: Path) -> list[subprocess.Popen[bytes]]:  # type: ignore[no-untyped-def]
    return [
        start_worker(coordinator, tmp_path, name, "--checkpoint-dir", str(tmp_path / f"ckpt-{name}"),
                     env={"ESSAIM_SOCKET_DIR": str(socket_dir)})
        for name in NAMES
    ]


def restart_and_finish(start_coordinator, tmp_path: Path, socket_dir: Path,  # type: ignore[no-untyped-def]
                       run: dict = RUN) -> None:
    """The coordinator again on the same database, the workers on the same checkpoint directories."""
    workers = start_workers(start_coordinator(**run), tmp_path, socket_dir)
    try:
        wait_all(workers, timeout=180)
    finally:
        for worker in workers:
            kill_group(worker)
    assert [w.returncode for w in workers] == [0, 0], logs(tmp_path, *NAMES)


def rounds_reported_by_both(sessions) -> int:  # type: ignore[no-untyped-def]
    return sum(1 for rows in contributions_by_round(sessions).values() if len(rows) == 2)


def checkpoint_of(tmp_path: Path, name: str):  # type: ignore[no-untyped-def]
    return read_checkpoint(latest_checkpoint(tmp_path / f"ckpt-{name}"))


def assert_whole_run(sessions, tmp_path: Path, stopped_in: int | None = None) -> None:  # type: ignore[no-untyped-def]
    """Every round averaged by both workers; in the round the stop fell into, one may have left before reporting."""
    by_round = contributions_by_round(sessions)
    assert sorted(by_round) == list(range(ROUNDS)), logs(tmp_path, *NAMES)
    for number, rows in by_round.items():
        assert len(rows) == 2 or (number == stopped_in and len(rows) == 1), f"round {number}: {rows}"
        assert {c.group_size for c in rows} == {2}, f"round {number}: {rows}"
        assert len({c.params_digest for c in rows}) == 1, f"round {number}: parameters differ"
    assert accounting_problems(sessions) == []


def vocab(corpus_dir: Path) -> int:
    return Manifest.load(corpus_dir / "manifest.json").vocab_size


def sample_loss(model, corpus_dir: Path) -> float:  # type: ignore[no-untyped-def]
    """Loss on the first tokens of every shard: a fixed sample of every source."""
    manifest = Manifest.load(corpus_dir / "manifest.json")
    tokens = torch.cat([torch.from_numpy(read_tokens(corpus_dir / s.file, s.dtype, 0, 256)) for s in manifest.shards])
    return mean_loss(model, tokens, seq_len=64)


@pytest.mark.parametrize("run", [RUN, OVERLAPPED], ids=["one-round-at-a-time", "overlapped"])
def test_a_stopped_run_resumes_from_its_checkpoints(
    start_coordinator, tmp_path: Path, corpus_dir: Path, socket_dir: Path, run: dict
):
    coordinator = start_coordinator(**run)
    sessions = coordinator.sessions()
    workers = start_workers(coordinator, tmp_path, socket_dir)
    try:
        wait_for(lambda: rounds_reported_by_both(sessions) >= 3, 120, "three rounds")
        for process in [*workers, coordinator.process]:  # every process: SIGTERM, as a cluster shutdown does
            stop_group(process)
    finally:
        for worker in workers:
            kill_group(worker)
    assert [w.returncode for w in workers] == [0, 0], logs(tmp_path, *NAMES)
    by_round = contributions_by_round(sessions)
    stopped_at = max(by_round)
    checkpoints = [checkpoint_of(tmp_path, name) for name in NAMES]
    # Each worker saved the state of the last round it completed: the swarm's. (A worker stopped
    # while its round's all-reduce finishes keeps the round before; it catches up on resuming.)
    for checkpoint in checkpoints:
        assert checkpoint.params_digest == by_round[checkpoint.next_round - 1][0].params_digest
    assert max(c.next_round for c in checkpoints) == stopped_at + 1
    saved = sorted(path.name for name in NAMES for path in (tmp_path / f"ckpt-{name}").glob("round-*"))
    assert saved and all(int(name.removeprefix("round-")) >= 0 for name in saved), saved  # only completed rounds

    restart_and_finish(start_coordinator, tmp_path, socket_dir, run)
    assert all(f"resumed from {tmp_path}" in (tmp_path / f"{n}.log").read_text() for n in NAMES)
    assert_whole_run(sessions, tmp_path, stopped_in=stopped_at)
    # Training carried on from the stop: on a fixed sample, initial > at the stop > at the end.
    final = checkpoint_of(tmp_path, "w0")
    assert final.next_round == ROUNDS
    losses = [sample_loss(model, corpus_dir) for model in
              (build_model("tiny", vocab(corpus_dir), seed=0), load_model(checkpoints[0]), load_model(final))]
    assert losses[0] > losses[1] > losses[2], losses


def test_a_crashed_run_rewinds_to_its_last_checkpoint_and_resumes(
    start_coordinator, tmp_path: Path, corpus_dir: Path, socket_dir: Path
):
    coordinator = start_coordinator(**RUN)
    sessions = coordinator.sessions()
    workers = start_workers(coordinator, tmp_path, socket_dir)
    try:
        wait_for(lambda: rounds_reported_by_both(sessions) >= 3, 120, "three rounds")
    finally:
        # A power cut: every process at once (killing them one by one, waiting for each, lets
        # the last worker save a checkpoint the others never reach); nobody saves or releases.
        for process in [*workers, coordinator.process]:
            os.killpg(process.pid, signal.SIGKILL)
        for process in [*workers, coordinator.process]:
            kill_group(process)
    recorded = max(contributions_by_round(sessions))
    checkpoint = checkpoint_of(tmp_path, "w0")
    assert checkpoint.next_round % 2 == 0 and checkpoint.next_round <= recorded  # rounds no checkpoint holds
    assert checkpoint_of(tmp_path, "w1").params_digest == checkpoint.params_digest

    def rewind() -> str | None:  # refused while the dead workers' leases have not yet passed their deadline
        result = subprocess.run(
            essaim_command("coordinator", "rewind", "--data", str(corpus_dir), "--database", coordinator.database_url,
                           "--to-round", str(checkpoint.next_round)),
            capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0 or "still live" in result.stderr, result.stderr
        return result.stdout if result.returncode == 0 else None

    printed = wait_for(rewind, 30, "the rewind")
    assert f"rewound {recorded + 1 - checkpoint.next_round} round(s)" in printed
    with sessions() as session:
        rewound = session.scalar(select(func.count(LineageRecord.id)).where(LineageRecord.rewound_at.is_not(None)))
    assert rewound >= 2 * (recorded + 1 - checkpoint.next_round)  # a round's tokens may span several leases
    assert accounting_problems(sessions) == []

    restart_and_finish(start_coordinator, tmp_path, socket_dir)
    assert_whole_run(sessions, tmp_path)
