"""`essaim report` (the run's plots) and `essaim audit summary` (the public summary of a model's training content)."""

from __future__ import annotations

from pathlib import Path

import typer

from essaim.cli_support import fail, run_database


def report(
    data: Path = typer.Option(..., "--data", help="The run's prepared corpus directory."),
    database: str = typer.Option("", help="SQLAlchemy URL; default: SQLite file coordinator.db in --data."),
    out: Path = typer.Option(..., "--out", help="Directory for the PNG plots (created if missing; plots replaced)."),
) -> None:
    """Write the run's plots as PNG: loss and held-out evaluation against tokens, compute utilisation and bytes
    averaged per round, tokens per institution, energy per round."""
    from coordinator.plots import write_plots
    from coordinator.report_data import run_series

    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file: give a directory for the plots")
    try:
        plots = write_plots(run_series(run_database(data, database), data), out)
    except (ValueError, OSError) as error:  # ReportError is a ValueError
        fail(str(error))
    for plot in plots:
        typer.echo(f"{plot.path}" + (f"  (empty: {plot.missing})" if plot.missing else ""))


def audit_summary(
    checkpoint: Path = typer.Argument(..., help="A checkpoint directory (round-NNNNNN, or the DIR holding 'latest'), "
                                      "or a fine-tune's output (its --out, or merged/)."),
    data: Path = typer.Option(..., "--data", help="The prepared corpus of the run that trained the checkpoint "
                              "(for a fine-tune: the run that trained its base)."),
    database: str = typer.Option("", help="SQLAlchemy URL; default: SQLite file coordinator.db in --data."),
    out: Path | None = typer.Option(None, "--out", help="The Markdown file (default: TRAINING_SUMMARY.md beside the "
                                    "model card); its JSON twin goes beside it, named .json."),
    force: bool = typer.Option(False, "--force", help="Replace an existing summary."),
    provider: str = typer.Option("", help="The provider's name and contact (the template's section 1.1)."),
    source_kind: list[str] = typer.Option(
        [], "--source-kind", help="SOURCE=KIND, how a source was obtained: public, licensed, private, crawled, user, "
        "synthetic or other (repeatable). The corpus config does not record it: unstated sources are listed as such."),
) -> None:
    """Write the public summary of a model's training content, after the EU AI Office's template (AI Act Art. 53(1)(d)),
    from the lineage, the manifest and the preparation report."""
    from coordinator.card import CardError
    from coordinator.training_summary import SummaryError, summary_of
    from coordinator.training_summary_text import SUMMARY_FILE, write_summary
    from model.checkpoints import CheckpointError

    if out is not None and out.suffix == ".json":
        fail(f"--out {out}: name the Markdown file (its JSON twin is written beside it)")
    try:
        summary, card_dir = summary_of(run_database(data, database), checkpoint, data, source_kind, provider)
        markdown, document = write_summary(summary, out or card_dir / SUMMARY_FILE, force)
    except (SummaryError, CardError, CheckpointError, FileExistsError, ValueError, OSError) as error:
        fail(str(error))
    typer.echo(f"training-content summary: {markdown}, {document}")
