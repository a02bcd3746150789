"""A small multilingual corpus built offline from text already on the machine.

For demos and tests: French and English from the system's gettext catalogs (each
French translation with its English source string) and Python code from the
standard library. Each part records where it came from and under which licence.
On minimal images without catalogs, deterministic generated sentences (CC0) stand
in for the missing French/English text, so the demo still runs.
"""

from __future__ import annotations

import datetime as dt
import gettext
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

LOCALE_DIR = Path("/usr/share/locale")
DPKG_INFO_DIR = Path("/var/lib/dpkg/info")
CODE_MODULES = ("json", "email", "asyncio")
# The sample's mixture, by language (Lucie's recipe has English 33 %, French 32.4 %, code 15 %).
LANGUAGE_WEIGHTS = {"fr": 40.0, "en": 40.0, "code": 20.0}
GENERATED_DATE = dt.date(2026, 1, 1)
GETTEXT_LICENCE = (
    "GPL-2.0-or-later and others (per Debian package; "
    "see /usr/share/doc/<package>/copyright)"
)


@dataclass
class _Part:
    """One future [[source]]: its files (relative to out_dir) and provenance notes."""

    name: str
    language: str
    licence: str
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    chars: int = 0
    dates: list[dt.date] = field(default_factory=list)

    def add(self, out_dir: Path, relative: str, text: str, note: str = "", origin: Path | None = None) -> None:
        """Write one document; its date is the modification day of the file it came from."""
        path = out_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        self.files.append(relative)
        self.chars += len(text)
        self.dates.append(dt.date.fromtimestamp(origin.stat().st_mtime) if origin else GENERATED_DATE)
        if note:
            self.notes.append(f"{relative} <- {note}")


def write_sample_corpus(out_dir: Path, chars_per_language: int = 400_000) -> Path:
    """Write the sample texts under ``out_dir`` and return ``out_dir/corpus.toml``.

    Each language (fr, en, code) gets at most ``chars_per_language`` characters.
    The same machine always gives the same corpus (sorted file order, fixed seeds).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fr = _Part("debian-gettext-fr", "fr", GETTEXT_LICENCE)
    en = _Part("debian-gettext-en", "en", GETTEXT_LICENCE)
    _add_gettext(out_dir, fr, en, chars_per_language)
    parts = [p for p in (fr, en) if p.files]
    # "Too small" means under half the budget: top up with generated text, kept as
    # its own source so no shard mixes licences.
    for part in (fr, en):
        if part.chars < chars_per_language // 2:
            parts.append(_generated(out_dir, part.language, chars_per_language - part.chars))
    code = _code_part(out_dir, chars_per_language)
    if code.files:
        parts.append(code)
    config = out_dir / "corpus.toml"
    config.write_text(_toml(parts), encoding="utf-8")
    return config


def _take(text: str, budget: int) -> str:
    """``text`` cut to at most ``budget`` characters, at a line end when there is one."""
    if len(text) <= budget:
        return text
    cut = text.rfind("\n", 0, budget)
    return text[: cut + 1] if cut > 0 else text[:budget]


def _add_gettext(out_dir: Path, fr: _Part, en: _Part, budget: int) -> None:
    """One document per catalog: its French translations, and its English msgids."""
    catalogs = sorted((LOCALE_DIR / "fr" / "LC_MESSAGES").glob("*.mo"))
    packages = _debian_packages(catalogs)
    for catalog in catalogs:
        if fr.chars >= budget and en.chars >= budget:
            break
        try:
            with open(catalog, "rb") as f:
                messages = gettext.GNUTranslations(f)._catalog
        except (OSError, UnicodeDecodeError, LookupError):
            continue  # an unreadable catalog only means less sample text
        pairs = []
        for key, translation in messages.items():
            # Plural forms are keyed (msgid, n): keep the first form once.
            msgid = key[0] if isinstance(key, tuple) else key
            if isinstance(key, tuple) and key[1] != 0:
                continue
            msgid = msgid.split("\x04")[-1].strip()  # drop any msgctxt prefix
            translation = translation.strip()
            if msgid and translation and msgid != translation:  # "" is the header
                pairs.append((translation, msgid))
        note = f"{catalog} (Debian package {packages.get(catalog, 'unknown')})"
        for part, index in ((fr, 0), (en, 1)):
            text = _take("\n".join(p[index] for p in pairs) + "\n", budget - part.chars)
            if text.strip():
                part.add(out_dir, f"{part.language}/{catalog.stem}.txt", text, note, catalog)


def _debian_packages(files: list[Path]) -> dict[Path, str]:
    """Which Debian package installed each file (from dpkg's file lists), if known."""
    wanted = {str(f): f for f in files}
    found: dict[Path, str] = {}
    for listing in sorted(DPKG_INFO_DIR.glob("*.list")):
        package = listing.stem.split(":")[0]
        for line in listing.read_text(encoding="utf-8", errors="replace").splitlines():
            if line in wanted:
                found[wanted[line]] = package
    return found


def _code_part(out_dir: Path, budget: int) -> _Part:
    """Standard library sources of a few modules, one document per file."""
    part = _Part("cpython-stdlib", "code", "PSF-2.0")
    for module_name in CODE_MODULES:
        module_dir = Path(__import__(module_name).__file__).parent
        for source in sorted(module_dir.rglob("*.py")):
            if part.chars >= budget:
                return part
            text = _take(source.read_text(encoding="utf-8"), budget - part.chars)
            relative = source.relative_to(module_dir.parent).as_posix()
            part.add(out_dir, f"code/{relative}.txt", text, str(source), source)
    return part


_WORDS = {
    "fr": (
        ["le chat", "la boulangère", "un vieux marin", "notre voisine", "l'étudiant",
         "la maire du village", "un enfant curieux", "ma grand-mère", "le facteur"],
        ["regarde", "répare", "prépare", "dessine", "traverse", "découvre", "attend",
         "raconte", "cherche"],
        ["la rivière", "un gâteau aux pommes", "les montagnes", "une lettre", "le pont",
         "une histoire étrange", "la forêt", "un bateau", "le marché"],
        ["sous la pluie", "avant l'été", "près de la gare", "avec patience",
         "chaque matin", "à la tombée de la nuit", "sans se presser", "en chantant"],
    ),
    "en": (
        ["the cat", "the baker", "an old sailor", "our neighbour", "the student",
         "the village mayor", "a curious child", "my grandmother", "the postman"],
        ["watches", "repairs", "prepares", "draws", "crosses", "discovers", "waits for",
         "tells", "looks for"],
        ["the river", "an apple cake", "the mountains", "a letter", "the bridge",
         "a strange story", "the forest", "a boat", "the market"],
        ["in the rain", "before summer", "near the station", "with patience",
         "every morning", "at nightfall", "without hurrying", "while singing"],
    ),
}


def _generated(out_dir: Path, language: str, chars: int) -> _Part:
    """Deterministic simple sentences, at most ``chars`` characters, ~20 000 per document."""
    part = _Part(f"essaim-generated-{language}", language, "CC0-1.0")
    rng = random.Random(f"essaim-sample-{language}")
    lines: list[str] = []
    total = 0
    while True:
        sentence = " ".join(rng.choice(words) for words in _WORDS[language])
        line = sentence[0].upper() + sentence[1:] + ".\n"
        if total + len(line) > chars:
            break
        lines.append(line)
        total += len(line)
    text = "".join(lines)
    while text:
        document = _take(text, 20_000)
        part.add(out_dir, f"{part.name}/{len(part.files):03d}.txt", document)
        text = text[len(document) :]
    return part


def _toml(parts: list[_Part]) -> str:
    language_chars = {p.language: sum(q.chars for q in parts if q.language == p.language) for p in parts}
    lines = ["# Sample corpus written by model.sample_corpus.write_sample_corpus.", ""]
    for part in parts:
        # A language's weight is shared among its sources by size.
        weight = LANGUAGE_WEIGHTS[part.language] * part.chars / language_chars[part.language]
        lines += [f"# {note}" for note in part.notes]
        lines += [
            "[[source]]",
            f"name = {_quote(part.name)}",
            f"language = {_quote(part.language)}",
            f"licence = {_quote(part.licence)}",
            f"weight = {weight:.4f}",
            f"date_from = {min(part.dates).isoformat()}",
            f"date_to = {max(part.dates).isoformat()}",
            "paths = [",
            *(f"  {_quote(f)}," for f in part.files),
            "]",
        ]
        if part.language == "code":
            lines += ["[source.filters]", "min_alpha_ratio = 0.3  # code has more symbols than prose"]
        lines.append("")
    return "\n".join(lines)


def _quote(text: str) -> str:
    # A JSON string without ASCII escaping is a valid TOML basic string.
    return json.dumps(text, ensure_ascii=False)
