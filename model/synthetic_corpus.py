"""A multilingual corpus of any size, in every input format, with known defects planted.

For the preparation benchmark and tests: documents are lines drawn from the
machine's gettext catalogs (real French, German, Spanish, Italian and their English
sources; generated words where catalogs are missing), written as JSONL (en, fr, with
URLs and dates), Parquet (de, es, it) and a directory of text files (code from the
standard library). Planted: exact and near duplicates, blocked URLs, banned words,
too-short documents, and optionally a malformed JSONL line and a record without text.
"""

from __future__ import annotations

import datetime as dt
import gettext
import json
import random
from pathlib import Path

from model.sample_corpus import LOCALE_DIR

LANGUAGES = {  # language: (format, weight), after Lucie's recipe
    "en": ("jsonl", 33.0), "fr": ("jsonl", 32.4), "de": ("parquet", 6.0), "es": ("parquet", 6.0),
    "it": ("parquet", 6.0), "code": ("text", 15.0),
}
BLOCKED_DOMAIN = "blocked.example"
BANNED_WORD = "badword"
_DEFECT_RATE = 0.02  # of documents, for each kind of planted defect


def _lines(language: str) -> list[str]:
    """Distinct message lines of a language from the gettext catalogs (msgids for English)."""
    source = "fr" if language == "en" else language
    lines: set[str] = set()
    for catalog in sorted((LOCALE_DIR / source / "LC_MESSAGES").glob("*.mo")):
        try:
            with open(catalog, "rb") as f:
                messages = gettext.GNUTranslations(f)._catalog
        except (OSError, UnicodeDecodeError, LookupError):
            continue
        for key, value in messages.items():
            text = (key[0] if isinstance(key, tuple) else key) if language == "en" else value
            text = " ".join(text.split("\x04")[-1].split())
            if len(text.split()) >= 3:
                lines.add(text)
    if len(lines) < 200:  # no catalogs here: pseudo-words keep the pipeline's work realistic
        rng = random.Random(language)
        syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "ba", "do", "fe"]
        words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
        lines = {" ".join(rng.choice(words) for _ in range(rng.randint(5, 15))) for _ in range(5000)}
    return sorted(lines)


def _code_files() -> list[Path]:
    """The standard library's Python files (not installed packages)."""
    library = Path(json.__file__).parent.parent
    return [p for p in sorted(library.rglob("*.py")) if "site-packages" not in p.parts and "test" not in p.parts]


def write_synthetic_corpus(out_dir: Path, megabytes: float, seed: int = 0, defects: bool = True,
                           part_megabytes: float | None = None) -> Path:
    """Write about ``megabytes`` of input under ``out_dir`` and return its corpus.toml.

    With ``part_megabytes``, each JSONL and Parquet source is a directory of files of about that
    size, as large corpora come (and as preparation's tasks share them out); else one file.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    total_weight = sum(weight for _, weight in LANGUAGES.values())
    sources = []
    for language, (file_format, weight) in LANGUAGES.items():
        budget = int(megabytes * 1e6 * weight / total_weight)
        documents = _documents(language, budget, rng, defects)
        name = f"synthetic-{language}"
        if part_megabytes and file_format != "text":
            path = out_dir / name
            path.mkdir(exist_ok=True)
            for number, part in enumerate(_parts(documents, part_megabytes)):
                _write(path, f"part-{number:05d}", file_format, part, rng, defects and number == 0)
        else:
            path = _write(out_dir, name, file_format, documents, rng, defects)
        sources.append((name, language, weight, path))
    (out_dir / "blocked-domains.txt").write_text(f"# planted\n{BLOCKED_DOMAIN}\n")
    (out_dir / "banned-en.txt").write_text(f"{BANNED_WORD}\n")
    (out_dir / "banned-fr.txt").write_text(f"{BANNED_WORD}\n")
    config = out_dir / "corpus.toml"
    config.write_text(_toml(sources))
    return config


def _documents(language: str, budget: int, rng: random.Random, defects: bool) -> list[dict]:
    if language == "code":
        documents, size = [], 0
        for path in _code_files():  # in order, so the code is distinct until the library runs out
            if size >= budget:
                break
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            documents.append({"text": text})
            size += len(text)
        return documents
    lines = _lines(language)
    documents: list[dict] = []
    size = 0
    while size < budget:
        text = "\n".join(rng.choice(lines) for _ in range(rng.randint(10, 60)))
        roll = rng.random()
        if defects and documents and roll < _DEFECT_RATE:
            text = documents[rng.randrange(len(documents))]["text"]  # exact duplicate
        elif defects and documents and roll < 2 * _DEFECT_RATE:
            words = documents[rng.randrange(len(documents))]["text"].split(" ")
            words[rng.randrange(len(words))] = "changed"  # near duplicate: one word differs
            text = " ".join(words)
        elif defects and roll < 3 * _DEFECT_RATE:
            text = f"{text} {BANNED_WORD}"
        elif defects and roll < 4 * _DEFECT_RATE:
            text = "Too short."
        year = 2015 + int(rng.random() * 10)
        day = dt.date(year, 1, 1) + dt.timedelta(days=rng.randrange(365))
        host = BLOCKED_DOMAIN if defects and rng.random() < _DEFECT_RATE else f"site{rng.randrange(1000)}.example"
        documents.append({"text": text, "url": f"https://{host}/{len(documents)}", "date": day.isoformat()})
        size += len(text)
    return documents


def _parts(documents: list[dict], megabytes: float) -> list[list[dict]]:
    parts: list[list[dict]] = [[]]
    size = 0
    for document in documents:
        if size >= megabytes * 1e6:
            parts.append([])
            size = 0
        parts[-1].append(document)
        size += len(document["text"])
    return parts


def _write(out_dir: Path, name: str, file_format: str, documents: list[dict], rng: random.Random, defects: bool) -> Path:
    if file_format == "jsonl":
        path = out_dir / f"{name}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for i, document in enumerate(documents):
                f.write(json.dumps(document, ensure_ascii=False) + "\n")
                if defects and i == 3:
                    f.write('{"text": "a line cut short\n')  # malformed JSON
                    f.write('{"url": "https://no-text.example/"}\n')  # a record without text
        return path
    if file_format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = out_dir / f"{name}.parquet"
        table = pa.table({
            "text": [d["text"] for d in documents], "url": [d["url"] for d in documents],
            "date": [dt.date.fromisoformat(d["date"]) for d in documents],
        })
        pq.write_table(table, path, row_group_size=2048)
        return path
    directory = out_dir / name
    directory.mkdir(exist_ok=True)
    for i, document in enumerate(documents):
        (directory / f"{i:06d}.py.txt").write_text(document["text"], encoding="utf-8")
    return directory


def _toml(sources: list[tuple[str, str, float, Path]]) -> str:
    lines = [
        "[corpus]", 'on_bad_record = "skip"', "",
        "[filters]", 'url_blocklist = ["blocked-domains.txt"]',
        'banned_words = { en = "banned-en.txt", fr = "banned-fr.txt" }', "",
        "[dedup]", "near_threshold = 0.8", "",
    ]
    for name, language, weight, path in sources:
        lines += [
            "[[source]]", f'name = "{name}"', f'language = "{language}"', 'licence = "CC0-1.0"',
            f"weight = {weight}", "date_from = 2015-01-01", "date_to = 2024-12-31", f'paths = ["{path.name}"]',
        ]
        if language == "code":
            lines += ["[source.filters]", "min_alpha_ratio = 0.3"]
        lines.append("")
    return "\n".join(lines)
