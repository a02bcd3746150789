"""Shared fixtures: a small prepared corpus, real coordinator processes, a real PostgreSQL server."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

from coordinator.store import open_engine, session_factory, sqlite_url
from essaim.processes import kill_group, start_role, stop_group, wait_for_ready_file
from model.corpus import prepare_corpus
from model.corpus_config import load_corpus_config
from model.sample_corpus import write_sample_corpus
from postgres import PostgresServer, postgres_available


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    if not postgres_available():
        pytest.fail("PostgreSQL is not installed: apt-get install postgresql (the store is tested on it)")
    server = PostgresServer()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database on each backend the store supports."""
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "coordinator.db")
    return request.getfixturevalue("postgres").create_database()


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~40k tokens of French, English and code, 512-token vocabulary, 4k-token shards in 2 KiB chunks."""
    root = tmp_path_factory.mktemp("corpus")
    config = write_sample_corpus(root / "text", chars_per_language=40_000)
    prepare_corpus(load_corpus_config(config), root / "data", vocab_size=512, shard_tokens=4096, chunk_bytes=2048)
    return root / "data"


@dataclass
class CoordinatorProcess:
    process: subprocess.Popen[bytes]
    address: str
    database_url: str
    log: Path
    fingerprint: str = ""  # of its TLS certificate, when it serves TLS

    def sessions(self):  # type: ignore[no-untyped-def]
        return session_factory(open_engine(self.database_url))


@pytest.fixture
def start_coordinator(tmp_path: Path, corpus_dir: Path) -> Iterator[Callable[..., CoordinatorProcess]]:
    """Start `essaim coordinator serve` with run settings given as keyword arguments (again: a restart)."""
    started: list[subprocess.Popen[bytes]] = []

    def start(port: int = 0, governance: Path | None = None, data: Path | None = None, extra: tuple[str, ...] = (),
              database_url: str = "", **run_settings: object) -> CoordinatorProcess:
        run_file = tmp_path / "run.toml"
        run_file.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in run_settings.items()))
        database_url = database_url or sqlite_url(tmp_path / "coordinator.db")
        ready, log = tmp_path / "ready.json", tmp_path / "coordinator.log"
        ready.unlink(missing_ok=True)  # a restart must not read the previous run's address
        process = start_role(
            ["coordinator", "serve", "--data", str(data or corpus_dir), "--database", database_url, "--port", str(port),
             "--run", str(run_file), "--ready-file", str(ready),
             *(["--governance", str(governance)] if governance else []), *extra],
            log,
        )
        started.append(process)
        serving = wait_for_ready_file(process, ready, log, timeout=90)
        return CoordinatorProcess(process, serving["address"], database_url, log, serving["fingerprint"])

    yield start
    for process in started:
        stop_group(process)
        if process.poll() is None:
            kill_group(process)
