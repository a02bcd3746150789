"""The corpus config: where text comes from, under which terms, and how it is cleaned.

A TOML file, validated here so that a mistake stops `essaim data prepare` before
anything is read, with the file and line of the offending source:

    [corpus]
    on_bad_record = "skip"      # or "stop": what a malformed line or a record without text does
    date_bucket = "year"        # shards never mix years, so leases can go oldest first
    heldout_fraction = 0.01     # of each source's documents, held out to evaluate on (never trained)

    [filters]                   # defaults for every source (see FilterSettings)
    url_blocklist = ["filters/blocked-domains.txt"]
    tdm_opt_outs = ["filters/tdm-reservations.txt"]   # domains or URL patterns reserved from text mining
    banned_words = { fr = "filters/banned-fr.txt" }

    [dedup]
    near_threshold = 0.8        # MinHash LSH over word 5-grams

    [[source]]
    name = "wiki-fr"            # letters, digits, '.', '_', '-' (names shard files)
    language = "fr"
    licence = "CC-BY-SA-4.0"
    weight = 32.4               # share of trained tokens, relative to the other sources
    date_from = 2019-01-01
    date_to = 2021-12-31
    paths = ["wiki/fr/"]        # files or directories, relative to this file
    format = "jsonl"            # jsonl (or .jsonl.gz), parquet, text; default: from the file names
    [source.filters]            # this source's own thresholds, e.g. for code
    min_alpha_ratio = 0.3
"""

from __future__ import annotations

import datetime as dt
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

_SOURCE_HEADER = re.compile(r"^\s*\[\[\s*source\s*\]\]")


class FilterSettings(BaseModel):
    """Document filters. Each one counts what it removes (see model.filters)."""

    model_config = ConfigDict(extra="forbid")

    min_chars: int = Field(20, ge=0)
    max_chars: int = Field(1_000_000, gt=0)
    min_words: int = Field(3, ge=0)
    # Of the characters that are not white space: letters at least, digits at most.
    min_alpha_ratio: float = Field(0.5, ge=0, le=1)
    max_digit_ratio: float = Field(0.3, ge=0, le=1)
    url_blocklist: list[Path] = []            # files of domains, one per line ('#' comments)
    # Files of domains ("example.com") or URL patterns ("example.org/news/*") whose owners reserved their
    # text-and-data-mining rights (EU directive 2019/790, Art. 4(3)): matching documents are removed.
    tdm_opt_outs: list[Path] = []
    banned_words: dict[str, Path] = {}        # language -> file of words or phrases, one per line
    max_banned_words: int = Field(0, ge=0)    # a document with more occurrences than this is removed


class DedupSettings(BaseModel):
    """Duplicates are looked for across the whole corpus; the first document seen is kept."""

    model_config = ConfigDict(extra="forbid")

    exact: bool = True
    near_threshold: float = Field(0.8, ge=0, le=1)  # estimated Jaccard similarity of word shingles; 0: off
    minhash_permutations: int = Field(128, ge=16, le=1024)
    shingle_words: int = Field(5, ge=1)


class SourceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    language: str = Field(min_length=1)
    licence: str = Field(min_length=1)
    weight: float = Field(ge=0)
    date_from: dt.date
    date_to: dt.date
    paths: list[Path] = Field(min_length=1)
    format: Literal["jsonl", "parquet", "text"] | None = None
    text_field: str = "text"
    url_field: str = "url"
    date_field: str = "date"
    filters: dict = {}  # this source's overrides of [filters], validated when merged

    @model_validator(mode="after")
    def _dates_in_order(self) -> "SourceConfig":
        if self.date_to < self.date_from:
            raise ValueError(f"date_to {self.date_to} is before date_from {self.date_from}")
        return self


class CorpusSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    on_bad_record: Literal["skip", "stop"] = "skip"
    date_bucket: Literal["year", "month"] = "year"
    vocab_size: int = Field(4096, ge=260)
    shard_tokens: int = Field(1 << 20, gt=0)
    # Shards are verified in chunks of this many bytes when workers fetch byte ranges of them;
    # a multiple of 4 so a chunk never splits a token.
    chunk_bytes: int = Field(1 << 20, ge=256, multiple_of=4)
    # The tokenizer learns from at most this much text, drawn from the sources by weight.
    tokenizer_chars: int = Field(200_000_000, gt=0)
    fertility_chars: int = Field(2_000_000, gt=0)  # per language, to measure tokens per word
    # A share of each source's kept documents, chosen by a hash of their text, is held out: never
    # trained on, never seen by the tokenizer, models are evaluated on it (model/evaluate.py).
    heldout_fraction: float = Field(0.01, ge=0, le=0.5)  # 0: no held-out split
    # ...and at least this many, or a quarter of a source too small for that (training keeps most).
    heldout_min_documents: int = Field(3, ge=0)


class CorpusConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    corpus: CorpusSettings = CorpusSettings()
    filters: FilterSettings = FilterSettings()
    dedup: DedupSettings = DedupSettings()
    source: list[SourceConfig] = Field(min_length=1)

    @field_validator("source")
    @classmethod
    def _unique_names(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        names = [s.name for s in sources]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"two sources are named {repeated[0]!r}; rename one")
        return sources

    @model_validator(mode="after")
    def _some_weight(self) -> "CorpusConfig":
        if not any(s.weight > 0 for s in self.source):
            raise ValueError("every source has weight 0: give at least one a positive weight")
        return self


class CorpusConfigError(ValueError):
    """A corpus config that cannot be used; the message names the file, line and field."""


@dataclass(frozen=True)
class Source:
    """One validated source, paths absolute and filters merged: what the pipeline works from."""

    name: str
    language: str
    licence: str
    weight: float
    date_from: dt.date
    date_to: dt.date
    paths: list[Path]
    format: str | None
    text_field: str
    url_field: str
    date_field: str
    filters: FilterSettings


@dataclass(frozen=True)
class Corpus:
    settings: CorpusSettings
    dedup: DedupSettings
    sources: list[Source]


def load_corpus_config(path: Path) -> Corpus:
    """Read, validate and resolve a corpus TOML (paths become absolute, filters merged per source)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CorpusConfigError(f"no corpus config at {path}") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise CorpusConfigError(f"{path}: not valid TOML: {error}") from None
    try:
        config = CorpusConfig(**document)
    except ValidationError as error:
        raise CorpusConfigError(_explain(error, path, text, document)) from None
    return _resolve(config, path)


def _resolve(config: CorpusConfig, path: Path) -> Corpus:
    lines = _source_lines(path.read_text(encoding="utf-8"))

    def absolute(p: Path) -> Path:
        return p if p.is_absolute() else path.parent / p

    sources = []
    for index, entry in enumerate(config.source):
        where = f"{path}:{lines[index]} (source {entry.name!r})" if index < len(lines) else str(path)
        try:
            filters = FilterSettings(**{**config.filters.model_dump(), **entry.filters})
        except ValidationError as error:
            raise CorpusConfigError(f"{where}: [source.filters]: {_first_error(error)}") from None
        filters.url_blocklist = [absolute(p) for p in filters.url_blocklist]
        filters.tdm_opt_outs = [absolute(p) for p in filters.tdm_opt_outs]
        filters.banned_words = {language: absolute(p) for language, p in filters.banned_words.items()}
        for file in [*filters.url_blocklist, *filters.tdm_opt_outs, *filters.banned_words.values()]:
            if not file.is_file():
                raise CorpusConfigError(f"{where}: filter list {file} does not exist")
        paths = [absolute(p) for p in entry.paths]
        for p in paths:
            if not p.exists():
                raise CorpusConfigError(f"{where}: {p} does not exist; fix the path or remove it")
        sources.append(
            Source(
                name=entry.name, language=entry.language, licence=entry.licence, weight=entry.weight,
                date_from=entry.date_from, date_to=entry.date_to, paths=paths, format=entry.format,
                text_field=entry.text_field, url_field=entry.url_field, date_field=entry.date_field, filters=filters,
            )
        )
    return Corpus(config.corpus, config.dedup, sources)


def _source_lines(text: str) -> list[int]:
    """The line number of each [[source]] header, in order (TOML parsers do not keep them)."""
    return [number for number, line in enumerate(text.splitlines(), start=1) if _SOURCE_HEADER.match(line)]


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"])
    return f"{field}: {first['msg']}"


def _explain(error: ValidationError, path: Path, text: str, document: dict) -> str:
    """One sentence per problem, naming the source's line and what to write."""
    lines = _source_lines(text)
    messages = []
    for problem in error.errors():
        location = list(problem["loc"])
        where = str(path)
        if location[:1] == ["source"] and len(location) >= 2 and isinstance(location[1], int):
            index = location[1]
            entry = document.get("source", [])[index]
            name = entry.get("name") if isinstance(entry, dict) else None
            where = f"{path}:{lines[index] if index < len(lines) else '?'} (source #{index + 1}"
            where += f" {name!r})" if name else ")"
            location = location[2:]
        field = ".".join(str(part) for part in location)
        if problem["type"] == "missing":
            messages.append(f"{where}: no {field}: {_HINTS.get(field, 'add it')}")
        elif problem["type"] == "extra_forbidden":
            hint = " (the field is spelled 'licence')" if field == "license" else ""
            messages.append(f"{where}: unknown field {field}{hint}")
        else:
            messages.append(f"{where}: {field + ': ' if field else ''}{problem['msg']}")
    return "; ".join(messages)


_HINTS = {
    "name": 'name = "wiki-fr"',
    "language": 'language = "fr" (or "en", "code", ...)',
    "licence": 'licence = "CC-BY-SA-4.0" (an SPDX identifier, or the terms in words): '
    "text without known terms cannot be trained on",
    "weight": "weight = 1.0 (its share of trained tokens, relative to the other sources)",
    "date_from": "date_from = 2020-01-01 (the oldest document's date)",
    "date_to": "date_to = 2024-12-31 (the newest document's date)",
    "paths": 'paths = ["texts/"] (files or directories, relative to the config file)',
    "source": "add [[source]] tables, one per source",
}
