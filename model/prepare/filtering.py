"""Stage 1: read a task's input files, count bad records, apply the quality filters, keep the rest.

A datatrove pipeline step. Each task writes the documents it keeps, in input order, to
its own JSON-lines file (the dedup stages read them back in that same order: their
document numbers are positions in it) and what happened to every record to a counts
file, per source: the prepare report is the sum of the tasks' counts.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from datatrove.pipeline.base import PipelineStep

from model.corpus_config import Corpus
from model.filters import QualityFilter, SourceReport
from model.ingest import BadRecord, read_file
from model.prepare.work import InputFile, WorkDir


class PrepareStopped(ValueError):
    """A bad record with ``on_bad_record = "stop"``: preparation ended and wrote nothing."""


def write_json_atomically(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(value, ensure_ascii=False))
    os.replace(partial, path)


def read_counts(paths: list[Path]) -> dict[str, SourceReport]:
    """Tasks' per-source counts, summed (bad examples: the first ones, in task order)."""
    total: dict[str, SourceReport] = {}
    for path in paths:
        for name, counts in json.loads(path.read_text()).items():
            into = total.setdefault(name, SourceReport())
            into.records += counts["records"]
            into.bad_records += counts["bad_records"]
            into.bad_examples = (into.bad_examples + counts["bad_examples"])[: SourceReport.MAX_EXAMPLES]
            for reason, removed in counts["removed"].items():
                sums = into.removed.setdefault(reason, {"documents": 0, "chars": 0})
                sums["documents"] += removed["documents"]
                sums["chars"] += removed["chars"]
            into.kept_documents += counts["kept_documents"]
            into.kept_chars += counts["kept_chars"]
    return total


class ReadAndFilter(PipelineStep):
    name = "read and filter"
    type = "essaim"

    def __init__(self, corpus: Corpus, plan: list[list[InputFile]], work: WorkDir) -> None:
        super().__init__()
        self.corpus, self.plan, self.work = corpus, plan, work

    def run(self, data=None, rank: int = 0, world_size: int = 1):  # type: ignore[no-untyped-def]
        sources = {source.name: source for source in self.corpus.sources}
        filters = {name: QualityFilter(source) for name, source in sources.items()}
        counts = {name: SourceReport() for name in sources}
        out = self.work.kept(rank)
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(f".{out.name}.partial")  # a task that dies leaves no file a rerun would trust
        with open(partial, "w", encoding="utf-8") as kept:
            for file in self.plan[rank]:
                source, tally = sources[file.source], counts[file.source]
                for item in read_file(Path(file.path), file.format, source):
                    if isinstance(item, BadRecord):
                        if self.corpus.settings.on_bad_record == "stop":
                            raise PrepareStopped(
                                f"{item}. Stopped, as the corpus config says (on_bad_record = \"stop\"); nothing was "
                                "written. Fix the record, or set on_bad_record = \"skip\" to leave such records out"
                            )
                        tally.bad(str(item))
                        self.stat_update("bad_records")
                        continue
                    tally.records += 1
                    reason = filters[file.source].reason(item)
                    if reason:
                        tally.remove(reason, len(item.text))
                        self.stat_update(reason)
                        continue
                    tally.keep(len(item.text))
                    self.stat_update("kept")
                    record = {"text": item.text, "source": file.source, "date": item.date.isoformat()}
                    kept.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(partial, out)
        write_json_atomically(self.work.counts("filter", rank), {n: asdict(c) for n, c in counts.items()})
