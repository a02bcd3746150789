"""`essaim report`: a run's records drawn as PNG plots, each one a real image of that run's figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from matplotlib.image import imread
from sqlalchemy import func, select
from typer.testing import CliRunner

from coordinator.plots import DPI, FIGURE_INCHES, PLOTS
from coordinator.report_data import run_series
from coordinator.store import Contribution, LineageRecord, sqlite_url
from essaim.cli import app
from run_records import LANGUAGES, record_run
from support import one_shard_store

SIZE = (round(FIGURE_INCHES[1] * DPI), round(FIGURE_INCHES[0] * DPI))  # rows, columns
# The colours each plot draws its data in: the loss curve, a curve per language (3), utilisation and
# traffic bars, the unverified tokens' bars, the estimated energy's bars.
DATA_COLOURS = {"loss": ["tab:blue"], "evaluation": ["tab:blue", "tab:orange", "tab:green"],
                "compute": ["tab:blue", "tab:orange"], "institutions": ["tab:gray"], "energy": ["tab:blue"]}


def report(corpus_dir: Path, database: str, out: Path):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, ["report", "--data", str(corpus_dir), "--database", database, "--out", str(out)])


def pixels_of(image: np.ndarray, colour: str) -> int:
    """How many pixels are (within antialiasing) of a matplotlib colour."""
    return int((np.abs(image[..., :3] - np.array(to_rgb(colour))).max(axis=-1) < 0.02).sum())


def test_report_draws_every_plot_of_the_runs_figures_and_a_longer_run_draws_different_ones(
    tmp_path: Path, corpus_dir: Path
) -> None:
    database = sqlite_url(tmp_path / "run.db")
    sessions = record_run(database, corpus_dir, rounds=3)

    # The figures are the records': tokens through each round, compute share, traffic, energy, credit.
    series = run_series(sessions, corpus_dir)
    with sessions() as session:
        lineage = session.scalar(select(func.sum(LineageRecord.end - LineageRecord.start)))
        joules = session.scalar(select(func.sum(Contribution.energy_joules)))
    assert [r.number for r in series.rounds] == [0, 1, 2]
    assert series.rounds[-1].cumulative_tokens == lineage
    assert [r.mean_loss for r in series.rounds] == [5.875, 4.875, 3.875]
    assert series.rounds[0].compute_share == pytest.approx((6.0 + 7.0) / 20.0)
    assert [r.bytes_sent for r in series.rounds] == [200_000, 400_000, 600_000]
    assert sum(sum(r.energy_joules.values()) for r in series.rounds) == pytest.approx(joules) and joules > 0
    assert set(series.language_evaluations) == set(LANGUAGES)
    assert [p.cumulative_tokens for p in series.language_evaluations["fr"]] == [r.cumulative_tokens for r in series.rounds]
    assert sum(sum(states.values()) for states in series.institution_tokens.values()) == lineage
    assert set(series.institution_tokens) == {"lab-a", "independent"}

    result = report(corpus_dir, database, tmp_path / "plots")
    assert result.exit_code == 0, result.output
    paths = [tmp_path / "plots" / f"{name}.png" for name in PLOTS]
    assert result.output.split() == [str(path) for path in paths]  # nothing empty: no note after a path
    images = {path.stem: imread(path) for path in paths}
    for name, image in images.items():
        assert image.shape[:2] == SIZE, name
        for colour in DATA_COLOURS[name]:  # the curves and bars are drawn, not only axes and titles
            assert pixels_of(image, colour) > 200, (name, colour)

    # Two more rounds: the same files, other pictures.
    longer = sqlite_url(tmp_path / "longer.db")
    record_run(longer, corpus_dir, rounds=5)
    assert report(corpus_dir, longer, tmp_path / "longer").exit_code == 0
    for name in PLOTS:
        again = imread(tmp_path / "longer" / f"{name}.png")
        assert again.shape == images[name].shape and not np.array_equal(again, images[name]), name


def test_plots_without_data_yet_say_what_is_missing_and_are_written_all_the_same(
    tmp_path: Path, corpus_dir: Path
) -> None:
    database = sqlite_url(tmp_path / "run.db")
    record_run(database, corpus_dir, rounds=2, evaluate=False, joules_per_round=0.0)
    result = report(corpus_dir, database, tmp_path / "plots")
    assert result.exit_code == 0, result.output
    lines = dict(line.split("  ", 1) if "  " in line else (line, "") for line in result.output.splitlines())
    assert lines[str(tmp_path / "plots" / "evaluation.png")].startswith("(empty: no held-out evaluation yet")
    assert lines[str(tmp_path / "plots" / "energy.png")].startswith("(empty: no energy recorded yet")
    assert lines[str(tmp_path / "plots" / "loss.png")] == ""
    for name in ("evaluation", "energy"):
        image = imread(tmp_path / "plots" / f"{name}.png")
        assert image.shape[:2] == SIZE
        assert all(pixels_of(image, colour) == 0 for colour in DATA_COLOURS[name])  # only the note
        assert (image[..., :3] < 0.5).any(axis=-1).sum() > 1000  # which is written
    assert len(list((tmp_path / "plots").iterdir())) == len(PLOTS)  # no temporary file left behind


def test_report_refuses_a_database_of_another_corpus_a_missing_one_and_a_file_for_out(
    tmp_path: Path, corpus_dir: Path
) -> None:
    other = sqlite_url(tmp_path / "other.db")
    one_shard_store(other)  # a run of another corpus
    result = report(corpus_dir, other, tmp_path / "plots")
    assert result.exit_code == 2 and "is not the one in" in result.output and "same run" in result.output
    assert not (tmp_path / "plots").exists()

    missing = report(corpus_dir, sqlite_url(tmp_path / "nowhere.db"), tmp_path / "plots")
    assert missing.exit_code == 2 and "no database at" in missing.output
    assert not (tmp_path / "nowhere.db").exists()

    (tmp_path / "file").write_text("")
    record_run(sqlite_url(tmp_path / "run.db"), corpus_dir, rounds=1)
    refused = report(corpus_dir, sqlite_url(tmp_path / "run.db"), tmp_path / "file")
    assert refused.exit_code == 2 and "is a file: give a directory" in refused.output
