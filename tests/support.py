"""Helpers the end-to-end tests share: waiting on a condition, starting workers, reading rounds."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

from sqlalchemy import select

from coordinator.store import Contribution, Worker, load_manifest, open_engine, session_factory
from model.shards import Manifest, ShardInfo, SourceInfo
from essaim.processes import free_port, start_role  # noqa: F401  (free_port: tests import it from here)


class Clock:
    """A clock a test moves by hand (`clock.now += 30`), for code that takes `clock=`."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def outer_steps_together(trainers: list, tokens: list[int], entries: list | None = None) -> list:
    """Each DiLoCoTrainer's outer step, all at once (so they can average together); their RoundResults."""
    results: list = [None] * len(trainers)

    def step(index: int) -> None:
        entry = entries[index] if entries is not None else None
        results[index] = trainers[index].outer_step(tokens_trained=tokens[index], cancel=threading.Event(), entry=entry)

    threads = [threading.Thread(target=step, args=(i,)) for i in range(len(trainers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def wait_for(condition, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def start_worker(coordinator, tmp_path: Path, name: str, *extra: str, env=None) -> subprocess.Popen[bytes]:  # type: ignore[no-untyped-def]
    return start_role(
        ["worker", "join", "--coordinator", coordinator.address, "--name", name,
         "--identity", str(tmp_path / f"{name}.key"), *extra],
        tmp_path / f"{name}.log",
        env={"OMP_NUM_THREADS": "1", **(env or {})},
    )


def wait_all(processes: list[subprocess.Popen[bytes]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in processes):
        assert time.monotonic() < deadline, "workers did not finish in time"
        time.sleep(0.5)


def one_shard_store(database_url: str):  # type: ignore[no-untyped-def]
    """A store holding one 100k-token shard and one registered worker "w", not yet measured; its session factory."""
    sessions = session_factory(open_engine(database_url))
    source = SourceInfo("s", "fr", "CC0-1.0", 1.0, "2020-01-01", "2020-12-31")
    shard = ShardInfo("s-0", "s-0.bin", "0" * 64, 100_000, "uint16", "fr", "s", "CC0-1.0", "2020-01-01", "2020-12-31")
    load_manifest(sessions, Manifest(1000, "t" * 64, [source], [shard]))
    with sessions.begin() as session:
        session.add(Worker(id="w", public_key=b"k" * 32, name="w", institution="lab", device="cpu",
                           registered_at=0.0, last_seen=0.0, tokens_per_second=0.0))
    return sessions


def contributions_by_round(sessions) -> dict[int, list[Contribution]]:  # type: ignore[no-untyped-def]
    with sessions() as session:
        rows = session.scalars(select(Contribution).order_by(Contribution.round, Contribution.worker_id)).all()
    by_round: dict[int, list[Contribution]] = {}
    for row in rows:
        by_round.setdefault(row.round, []).append(row)
    return by_round


def logs(tmp_path: Path, *names: str) -> str:
    return "\n".join(f"--- {name}\n" + (tmp_path / f"{name}.log").read_text()[-2500:] for name in names)
