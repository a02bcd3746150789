"""A real PostgreSQL server for tests: initdb on tmpfs, 127.0.0.1 only, stopped by the fixture.

Recipe from FIELD-NOTES: initdb refuses to run as root, so as root the server runs
as the `postgres` user; its data directory lives under /dev/shm (fast, and outside
pytest's 0700 temporary directories).
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from support import free_port


def _binary(name: str) -> str | None:
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return candidates[0] if candidates else shutil.which(name)


def postgres_available() -> bool:
    return all(_binary(name) for name in ("initdb", "pg_ctl")) and (os.geteuid() != 0 or _has_user("postgres"))


def _has_user(name: str) -> bool:
    return subprocess.run(["id", name], capture_output=True).returncode == 0



class PostgresServer:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="essaim-pg-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
        self.data, self.sockets = self.root / "data", self.root / "sockets"
        self.sockets.mkdir()
        self.port = free_port()
        self._names = itertools.count()
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
            shutil.chown(self.sockets, "postgres")
        self._run(_binary("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        self._run(
            _binary("pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "start", "-o",
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.sockets} -c fsync=off -c max_connections=200",
        )

    def _run(self, *command: str | None) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        result = subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{command[0]} failed: {result.stdout}{result.stderr}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A fresh, empty database; returns its SQLAlchemy URL."""
        import psycopg

        name = f"essaim_test_{next(self._names)}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run(_binary("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
