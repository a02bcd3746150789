"""Reading a source's documents, one at a time, from JSONL, Parquet or text files.

Each reader is a generator, so memory stays flat however large the input: JSONL is
read line by line (gzip too), Parquet in record batches, a text file is one
document. A record that cannot be used becomes a ``BadRecord`` naming its file and
line (or row) and what is wrong; the caller decides whether to skip it or stop.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from model.corpus_config import Source

_PARQUET_BATCH_ROWS = 1024


@dataclass(frozen=True)
class Document:
    text: str
    date: dt.date
    url: str | None
    origin: str  # "file:line" (JSONL), "file row N" (Parquet) or "file" (text)


@dataclass(frozen=True)
class BadRecord:
    origin: str
    reason: str

    def __str__(self) -> str:
        return f"{self.origin}: {self.reason}"


def source_files(source: Source) -> list[tuple[Path, str]]:
    """Every input file of a source with its format, directories expanded in name order."""
    files = []
    for path in source.paths:
        candidates = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")) if path.is_dir() else [path]
        for file in candidates:
            files.append((file, source.format or _format_of(file)))
    return files


def _format_of(file: Path) -> str:
    name = file.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def read_source(source: Source) -> Iterator[Document | BadRecord]:
    for file, file_format in source_files(source):
        yield from read_file(file, file_format, source)


def read_file(file: Path, file_format: str, source: Source) -> Iterator[Document | BadRecord]:
    """One input file's documents and bad records, in order."""
    readers = {"jsonl": _read_jsonl, "parquet": _read_parquet, "text": _read_text}
    yield from readers[file_format](file, source)


def _read_jsonl(file: Path, source: Source) -> Iterator[Document | BadRecord]:
    opener = gzip.open if file.name.endswith(".gz") else open
    try:
        with opener(file, "rb") as lines:
            for number, raw in enumerate(lines, start=1):
                origin = f"{file}:{number}"
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw.rstrip(b"\r\n"))
                except UnicodeDecodeError as error:
                    yield BadRecord(origin, f"not UTF-8 ({error.reason} at byte {error.start})")
                    continue
                except json.JSONDecodeError as error:
                    yield BadRecord(origin, f"not valid JSON ({error.msg} at column {error.colno})")
                    continue
                if not isinstance(record, dict):
                    yield BadRecord(origin, f"a JSON {type(record).__name__}, not an object with a {source.text_field!r} field")
                    continue
                yield _document(record.get(source.text_field), record.get(source.url_field),
                                record.get(source.date_field), origin, source)
    except (OSError, EOFError) as error:  # unreadable, or a truncated gzip stream
        yield BadRecord(str(file), f"unreadable ({error}); the records after this point were not read")


def _read_parquet(file: Path, source: Source) -> Iterator[Document | BadRecord]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
        names = set(parquet.schema_arrow.names)
    except (OSError, pa.ArrowException) as error:
        yield BadRecord(str(file), f"unreadable Parquet file ({error})")
        return
    if source.text_field not in names:
        yield BadRecord(str(file), f"no column {source.text_field!r} (columns: {', '.join(sorted(names))}); "
                                   "set text_field for this source")
        return
    columns = [c for c in (source.text_field, source.url_field, source.date_field) if c in names]
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
            absent = [None] * batch.num_rows
            texts, urls, dates = (
                batch.column(c).to_pylist() if c in columns else absent
                for c in (source.text_field, source.url_field, source.date_field)
            )
            for text, url, date in zip(texts, urls, dates):
                row += 1
                yield _document(text, url, date, f"{file} row {row}", source)
    except (OSError, pa.ArrowException) as error:
        yield BadRecord(f"{file} row {row + 1}", f"unreadable Parquet data ({error}); the rest of the file was not read")


def _read_text(file: Path, source: Source) -> Iterator[Document | BadRecord]:
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        yield BadRecord(str(file), f"not UTF-8 ({error.reason} at byte {error.start}); convert it (iconv -t UTF-8)")
        return
    except OSError as error:
        yield BadRecord(str(file), f"unreadable ({error})")
        return
    yield _document(text, None, None, str(file), source)


def _document(text: object, url: object, date: object, origin: str, source: Source) -> Document | BadRecord:
    if not isinstance(text, str):
        what = "missing" if text is None else f"a {type(text).__name__}, not a string"
        return BadRecord(origin, f"no text: field {source.text_field!r} is {what}")
    if not text.strip():
        return BadRecord(origin, f"no text: field {source.text_field!r} is empty")
    if date is None or date == "":
        day = source.date_from  # undated documents take the source's oldest date
    else:
        day = _parse_date(date)
        if day is None:
            return BadRecord(origin, f"field {source.date_field!r} is {date!r}, not a date (write 2021-03-04 or 2021)")
    return Document(text, day, url if isinstance(url, str) and url else None, origin)


def _parse_date(value: object) -> dt.date | None:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    if isinstance(value, int) and 1 <= value <= 9999:
        return dt.date(value, 1, 1)
    if isinstance(value, str):
        text = value.strip()
        try:
            if len(text) == 4:
                return dt.date(int(text), 1, 1)
            if len(text) == 7:
                return dt.date(int(text[:4]), int(text[5:7]), 1)
            return dt.date.fromisoformat(text[:10])
        except ValueError:
            return None
    return None
