"""Reading JSONL, Parquet and text sources, and naming every bad record's file and line."""

import datetime as dt
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from model.corpus_config import FilterSettings, Source
from model.ingest import BadRecord, Document, read_source


def _source(paths: list[Path], **fields) -> Source:
    defaults = dict(name="s", language="fr", licence="CC0-1.0", weight=1.0, date_from=dt.date(2020, 1, 1),
                    date_to=dt.date(2024, 12, 31), paths=paths, format=None, text_field="text", url_field="url",
                    date_field="date", filters=FilterSettings())
    return Source(**{**defaults, **fields})


def test_jsonl_records_become_documents_and_bad_lines_are_named(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text(
        json.dumps({"text": "Bonjour", "url": "https://x.example/1", "date": "2021-03-04T10:00:00Z"}) + "\n"
        + '{"text": "cut\n'
        + "\n"  # blank lines are not records
        + json.dumps({"url": "https://x.example/2"}) + "\n"
        + json.dumps(["a list"]) + "\n"
        + json.dumps({"text": "   "}) + "\n"
        + json.dumps({"text": "sans date", "date": "bientôt"}) + "\n"
        + json.dumps({"text": "Salut"}) + "\n",
        encoding="utf-8",
    )
    items = list(read_source(_source([path])))
    assert items[0] == Document("Bonjour", dt.date(2021, 3, 4), "https://x.example/1", f"{path}:1")
    bad = [str(item) for item in items if isinstance(item, BadRecord)]
    assert bad == [
        f"{path}:2: not valid JSON (Unterminated string starting at at column 10)",
        f"{path}:4: no text: field 'text' is missing",
        f"{path}:5: a JSON list, not an object with a 'text' field",
        f"{path}:6: no text: field 'text' is empty",
        f"{path}:7: field 'date' is 'bientôt', not a date (write 2021-03-04 or 2021)",
    ]
    assert items[-1] == Document("Salut", dt.date(2020, 1, 1), None, f"{path}:8")  # undated: the source's first day


def test_gzipped_jsonl_and_a_truncated_stream_are_read_as_far_as_possible(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl.gz"
    data = gzip.compress(b"".join(json.dumps({"text": f"doc {i}"}).encode() + b"\n" for i in range(100)))
    path.write_bytes(data[: len(data) // 2])
    items = list(read_source(_source([path])))
    assert isinstance(items[-1], BadRecord) and "unreadable" in items[-1].reason
    assert all(isinstance(item, Document) for item in items[:-1]) and len(items) > 1


def test_parquet_is_read_in_batches_with_native_dates_and_custom_fields(tmp_path: Path) -> None:
    path = tmp_path / "a.parquet"
    texts = [f"Hallo Welt {i}" for i in range(3000)]
    pq.write_table(pa.table({"body": texts, "day": [dt.date(2022, 5, 1)] * 3000}), path, row_group_size=500)
    items = list(read_source(_source([path], text_field="body", date_field="day")))
    assert [item.text for item in items] == texts
    assert items[2999].origin == f"{path} row 3000" and items[0].date == dt.date(2022, 5, 1)


def test_an_unreadable_parquet_file_or_a_missing_column_is_one_bad_record(tmp_path: Path) -> None:
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"content": ["x"]}), wrong)
    items = list(read_source(_source([tmp_path])))
    assert [type(item) for item in items] == [BadRecord, BadRecord]
    assert items[0].origin == str(broken) and "unreadable Parquet file" in items[0].reason
    assert items[1].reason.startswith("no column 'text' (columns: content)")


def test_a_directory_of_text_files_gives_one_document_per_file(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.txt").write_text("deux", encoding="utf-8")
    (tmp_path / "one.txt").write_text("un", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / ".hidden").write_text("caché")
    items = list(read_source(_source([tmp_path], format="text")))
    assert [(type(i).__name__, Path(i.origin).name) for i in items] == [
        ("Document", "two.txt"), ("BadRecord", "latin1.txt"), ("Document", "one.txt")
    ]
    assert "not UTF-8" in items[1].reason
