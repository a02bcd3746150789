"""The corpus preparation report, as tables on the terminal (the JSON file holds the same figures)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from model.corpus import PrepareReport
from model.filters import REASONS


def print_report(report: PrepareReport, console: Console | None = None) -> None:
    console = console or Console(stderr=True)
    sources = Table(title="Sources", title_justify="left")
    for column in ("source", "records", "bad", "removed", "kept", "kept MB", "tokens", "held out (docs, tokens)"):
        sources.add_column(column, justify="left" if column == "source" else "right")
    for name, counts in report.sources.items():
        removed = sum(r["documents"] for r in counts.removed.values())
        heldout = report.heldout.get(name, {})  # never trained: evaluated on (essaim eval)
        sources.add_row(name, f"{counts.records:,}", f"{counts.bad_records:,}", f"{removed:,}",
                        f"{counts.kept_documents:,}", f"{counts.kept_chars / 1e6:.2f}", f"{counts.tokens:,}",
                        f"{heldout.get('documents', 0):,}, {heldout.get('tokens', 0):,}")
    console.print(sources)

    removed = Table(title="Removed, by filter", title_justify="left")
    for column in ("filter", "documents", "MB"):
        removed.add_column(column, justify="left" if column == "filter" else "right")
    for reason in REASONS:
        documents = sum(c.removed.get(reason, {}).get("documents", 0) for c in report.sources.values())
        chars = sum(c.removed.get(reason, {}).get("chars", 0) for c in report.sources.values())
        removed.add_row(reason, f"{documents:,}", f"{chars / 1e6:.2f}")
    console.print(removed)

    bad = [example for counts in report.sources.values() for example in counts.bad_examples]
    if bad:
        console.print("Bad records (first ones; all counted above):")
        for example in bad[:10]:
            console.print(f"  {example}", markup=False, highlight=False)

    if report.fertility:
        fertility = Table(title="Tokenizer fertility (tokens per word, held-out text)", title_justify="left")
        for column in ("language", "this tokenizer", "English-only tokenizer", "fewer tokens"):
            fertility.add_column(column, justify="left" if column == "language" else "right")
        for language, figures in report.fertility.items():
            english = figures.get("english_only_tokens_per_word")
            gain = f"{1 - figures['tokens_per_word'] / english:+.1%}" if english else "-"
            fertility.add_row(language, f"{figures['tokens_per_word']:.3f}",
                              f"{english:.3f}" if english else "-", gain)
        console.print(fertility)
