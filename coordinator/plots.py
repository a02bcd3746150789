"""`essaim report`: a run's plots as PNG files, drawn off-screen (matplotlib's Figure: no display, no pyplot state).

Every plot is always written, so a reader (or a script) finds the same files at every stage
of a run: one whose data does not exist yet (no evaluation, no energy measured) says so in its
middle instead of being left out, and `write_plots` returns what is missing with its path.
Each file is drawn into a temporary name beside it, then renamed: never half-written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, MaxNLocator, PercentFormatter

from coordinator.energy import JOULES_PER_KWH
from coordinator.report_data import RunSeries
from protocol.choices import INDEPENDENT

FIGURE_INCHES = (10.0, 5.0)
DPI = 100  # 1000 x 500 pixels
CREDIT_COLOURS = {"verified": "tab:green", "unverified": "tab:gray", "rejected": "tab:red"}


@dataclass(frozen=True)
class Plot:
    path: Path
    missing: str | None  # what the plot has no data for yet; None when it shows data


def write_plots(series: RunSeries, out_dir: Path) -> list[Plot]:
    out_dir.mkdir(parents=True, exist_ok=True)
    return [_write(out_dir / f"{name}.png", draw, series) for name, draw in PLOTS.items()]


def _write(path: Path, draw: Callable[[Figure, RunSeries], str | None], series: RunSeries) -> Plot:
    figure = Figure(figsize=FIGURE_INCHES, dpi=DPI, layout="constrained")
    missing = draw(figure, series)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        figure.savefig(partial, format="png")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return Plot(path, missing)


def _missing(axes: Axes, message: str) -> str:
    """An empty plot that says what it is waiting for."""
    axes.text(0.5, 0.5, message, ha="center", va="center", transform=axes.transAxes, fontsize=13, wrap=True)
    axes.set_xticks([])
    axes.set_yticks([])
    return message


def _tokens_axis(axes: Axes) -> None:
    axes.set_xlabel("tokens trained")
    axes.xaxis.set_major_formatter(EngFormatter())
    axes.grid(alpha=0.3)


def _rounds_axis(axes: Axes) -> None:
    axes.set_xlabel("round")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3, axis="y")


def draw_loss(figure: Figure, series: RunSeries) -> str | None:
    axes = figure.subplots()
    axes.set_title("Training loss against tokens trained (mean over each round's kept reports)")
    if not series.rounds:
        return _missing(axes, "no round kept yet")
    axes.plot([r.cumulative_tokens for r in series.rounds], [r.mean_loss for r in series.rounds], marker="o")
    axes.set_ylabel("loss (nats per token)")
    _tokens_axis(axes)
    return None


def draw_evaluation(figure: Figure, series: RunSeries) -> str | None:
    figure.suptitle("Held-out evaluation per language against tokens trained")
    if not series.language_evaluations:
        return _missing(figure.subplots(), "no held-out evaluation yet: the run evaluates every eval_every_rounds rounds")
    bits, loss = figure.subplots(1, 2)
    for language, points in series.language_evaluations.items():
        tokens = [p.cumulative_tokens for p in points]
        bits.plot(tokens, [p.bits_per_byte for p in points], marker="o", label=language)
        loss.plot(tokens, [p.loss for p in points], marker="o", label=language)
    bits.set_ylabel("bits per byte (compares across tokenizers)")
    loss.set_ylabel("loss (nats per token)")
    for axes in (bits, loss):
        _tokens_axis(axes)
        axes.legend(title="language")
    return None


def draw_compute(figure: Figure, series: RunSeries) -> str | None:
    figure.suptitle("Compute utilisation and averaging traffic per round")
    measured = [r for r in series.rounds if r.compute_share is not None]
    if not measured:
        return _missing(figure.subplots(), "no contribution recorded yet")
    share, traffic = figure.subplots(1, 2)
    numbers = [r.number for r in measured]
    share.bar(numbers, [r.compute_share for r in measured], color="tab:blue")
    share.set_ylabel("time in inner steps / wall time")
    share.yaxis.set_major_formatter(PercentFormatter(1.0))
    share.set_ylim(0, 1)
    traffic.bar(numbers, [r.bytes_sent for r in measured], color="tab:orange")
    traffic.set_ylabel("bytes averaged (sent by the round's workers)")
    traffic.yaxis.set_major_formatter(EngFormatter(unit="B"))
    for axes in (share, traffic):
        _rounds_axis(axes)
    return None


def draw_institutions(figure: Figure, series: RunSeries) -> str | None:
    axes = figure.subplots()
    axes.set_title("Tokens trained per institution, by what the checks of their rounds found")
    if not series.institution_tokens:
        return _missing(axes, "no tokens in the lineage yet")
    names = list(series.institution_tokens)
    labels = ["volunteers (no institution)" if name == INDEPENDENT else name for name in names]
    left = [0] * len(names)
    for state, colour in CREDIT_COLOURS.items():
        counts = [series.institution_tokens[name][state] for name in names]
        axes.barh(labels, counts, left=left, color=colour, label=state)
        left = [a + b for a, b in zip(left, counts)]
    axes.xaxis.set_major_formatter(EngFormatter())
    axes.set_xlabel("tokens")
    axes.invert_yaxis()  # first institution on top
    figure.legend(loc="outside right upper", title="checked")
    axes.grid(alpha=0.3, axis="x")
    return None


def draw_energy(figure: Figure, series: RunSeries) -> str | None:
    axes = figure.subplots()
    axes.set_title("Energy per round, by how it was measured (an estimate is from rated power and utilisation)")
    methods = sorted({method for r in series.rounds for method in r.energy_joules})
    if not methods:
        return _missing(axes, "no energy recorded yet (workers report it with each round)")
    numbers = [r.number for r in series.rounds]
    bottom = [0.0] * len(numbers)
    for method in methods:
        kwh = [r.energy_joules.get(method, 0.0) / JOULES_PER_KWH for r in series.rounds]
        axes.bar(numbers, kwh, bottom=bottom, label=method)
        bottom = [a + b for a, b in zip(bottom, kwh)]
    _rounds_axis(axes)
    axes.set_ylabel("kWh")
    figure.legend(loc="outside right upper", title="measured by")
    return None


PLOTS: dict[str, Callable[[Figure, RunSeries], str | None]] = {
    "loss": draw_loss, "evaluation": draw_evaluation, "compute": draw_compute,
    "institutions": draw_institutions, "energy": draw_energy,
}
