"""What the `essaim` command's modules share: where state lives by default, and how a command fails."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer

DEFAULT_STATE_DIR = Path.home() / ".essaim"


def fail(message: str) -> NoReturn:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=2)
