"""What the `essaim` command's modules share: where state lives by default, and how a command fails."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer

DEFAULT_STATE_DIR = Path.home() / ".essaim"


def fail(message: str) -> NoReturn:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=2)


def run_database(data: Path, database: str):  # type: ignore[no-untyped-def]
    """Sessions on the run's database (--database, else DATA/coordinator.db), refusing to create one where none exists."""
    from coordinator.store import MissingDatabase, open_engine, session_factory, sqlite_url

    try:
        return session_factory(open_engine(database or sqlite_url(data / "coordinator.db"), create=False))
    except MissingDatabase as error:
        fail(str(error))
