"""Helpers the end-to-end tests share: waiting on a condition, starting workers, reading rounds."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from sqlalchemy import select

from coordinator.store import Contribution
from essaim.processes import free_port, start_role  # noqa: F401  (free_port: tests import it from here)


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


def contributions_by_round(sessions) -> dict[int, list[Contribution]]:  # type: ignore[no-untyped-def]
    with sessions() as session:
        rows = session.scalars(select(Contribution).order_by(Contribution.round, Contribution.worker_id)).all()
    by_round: dict[int, list[Contribution]] = {}
    for row in rows:
        by_round.setdefault(row.round, []).append(row)
    return by_round


def logs(tmp_path: Path, *names: str) -> str:
    return "\n".join(f"--- {name}\n" + (tmp_path / f"{name}.log").read_text()[-2500:] for name in names)
