"""Document quality filters: each names why it removes a document, so the report can count it.

The checks follow Lucie's recipe: blocked URL domains, banned words per language,
length and character-ratio heuristics; and the text-and-data-mining reservations
(opt-outs) the corpus lists. Duplicates are the dedup stages' job (model/prepare/dedup.py).
A filter is built once per source from its FilterSettings; lists are read once.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from model.corpus_config import Source
from model.ingest import Document

REASONS = (
    "date_outside_range", "tdm_opt_out", "blocked_url", "too_short", "too_long", "too_few_words",
    "low_alpha_ratio", "high_digit_ratio", "banned_words", "exact_duplicate", "near_duplicate",
)


@lru_cache(maxsize=None)
def _read_list(path: Path) -> tuple[str, ...]:
    """Non-empty lines of a list file, '#' comments dropped, lower-cased."""
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        entry = line.split("#", 1)[0].strip().lower()
        if entry:
            entries.append(entry)
    return tuple(entries)


@lru_cache(maxsize=None)
def _banned_pattern(path: Path) -> re.Pattern[str] | None:
    words = _read_list(path)
    if not words:
        return None
    # Longest first so a phrase wins over a word it starts with; whole words only.
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


class OptOuts:
    """Text-and-data-mining reservations: a line is a domain (its subdomains too) or a URL pattern.

    A pattern ("example.org/news/*", "*.example.net/*") holds a '/' or a '*' and is matched,
    as a shell pattern, against the URL without its scheme, lower-cased. A document without a
    URL cannot be matched, and is kept.
    """

    def __init__(self, lists: list[Path]) -> None:
        entries = [entry for path in lists for entry in _read_list(path)]
        self.domains = frozenset(e for e in entries if "/" not in e and "*" not in e)
        patterns = [fnmatch.translate(e) for e in entries if "/" in e or "*" in e]
        self.pattern = re.compile("|".join(patterns)) if patterns else None
        self.entries = len(entries)

    def reserved(self, url: str) -> bool:
        parts = urlsplit(url if "//" in url else f"//{url}")
        host = (parts.hostname or "").lower()
        if _under_domain(host, self.domains):
            return True
        address = f"{host}{parts.path or '/'}{'?' + parts.query if parts.query else ''}".lower()
        return self.pattern is not None and self.pattern.match(address) is not None


def _under_domain(host: str, domains: frozenset[str]) -> bool:
    """Whether ``host`` is one of ``domains`` or under one ("ads.example.com" is under "example.com")."""
    labels = host.split(".")
    return any(".".join(labels[i:]) in domains for i in range(len(labels)))


class QualityFilter:
    """The per-source checks, cheapest first; ``reason`` gives the first one that fails."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.settings = source.filters
        self.blocked_domains = frozenset(d for path in self.settings.url_blocklist for d in _read_list(path))
        self.opt_outs = OptOuts(self.settings.tdm_opt_outs)
        banned_list = self.settings.banned_words.get(source.language)
        self.banned = _banned_pattern(banned_list) if banned_list else None

    def reason(self, document: Document) -> str | None:
        s, text = self.settings, document.text
        if not self.source.date_from <= document.date <= self.source.date_to:
            return "date_outside_range"
        if document.url and self.opt_outs.entries and self.opt_outs.reserved(document.url):
            return "tdm_opt_out"
        if document.url and self._blocked(document.url):
            return "blocked_url"
        if len(text) < s.min_chars:
            return "too_short"
        if len(text) > s.max_chars:
            return "too_long"
        words = text.split()
        if len(words) < s.min_words:
            return "too_few_words"
        visible = sum(map(len, words))  # str.split's white space is str.isspace's
        letters, digits = letters_and_digits(text)
        if visible and letters / visible < s.min_alpha_ratio:
            return "low_alpha_ratio"
        if visible and digits / visible > s.max_digit_ratio:
            return "high_digit_ratio"
        if self.banned is not None and self._banned_count(text) > s.max_banned_words:
            return "banned_words"
        return None

    def _blocked(self, url: str) -> bool:
        return _under_domain((urlsplit(url if "//" in url else f"//{url}").hostname or "").lower(), self.blocked_domains)

    def _banned_count(self, text: str) -> int:
        count = 0
        for _ in self.banned.finditer(text):
            count += 1
            if count > self.settings.max_banned_words:
                break
        return count


def letters_and_digits(text: str) -> tuple[int, int]:
    """How many of ``text``'s characters are str.isalpha and str.isdigit, counted in numpy.

    Characters of the basic multilingual plane are looked up in tables made from those two
    methods (so the counts are theirs exactly); the rare ones above it are asked one by one.
    """
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    is_letter, is_digit = _plane_zero_tables()
    basic = codes[codes < _PLANE_ZERO]
    above = [chr(code) for code in codes[codes >= _PLANE_ZERO].tolist()]
    return (int(is_letter[basic].sum()) + sum(map(str.isalpha, above)),
            int(is_digit[basic].sum()) + sum(map(str.isdigit, above)))


_PLANE_ZERO = 0x10000


@cache
def _plane_zero_tables() -> tuple[np.ndarray, np.ndarray]:
    characters = [chr(code) for code in range(_PLANE_ZERO)]
    return (np.fromiter(map(str.isalpha, characters), dtype=bool, count=_PLANE_ZERO),
            np.fromiter(map(str.isdigit, characters), dtype=bool, count=_PLANE_ZERO))


@dataclass
class SourceReport:
    """What happened to one source's records: read, bad, removed (by reason), kept."""

    records: int = 0
    bad_records: int = 0
    bad_examples: list[str] = field(default_factory=list)  # the first few, as "file:line: reason"
    removed: dict[str, dict[str, int]] = field(default_factory=dict)  # reason -> {"documents", "chars"}
    kept_documents: int = 0
    kept_chars: int = 0
    tokens: int = 0

    MAX_EXAMPLES = 20

    def bad(self, description: str) -> None:
        self.bad_records += 1
        if len(self.bad_examples) < self.MAX_EXAMPLES:
            self.bad_examples.append(description)

    def remove(self, reason: str, chars: int) -> None:
        counts = self.removed.setdefault(reason, {"documents": 0, "chars": 0})
        counts["documents"] += 1
        counts["chars"] += chars

    def keep(self, chars: int) -> None:
        self.kept_documents += 1
        self.kept_chars += chars
