"""Quality filters and deduplication: each removes what it should, and says why."""

import dataclasses
import datetime as dt
import random
from pathlib import Path

from model.corpus_config import DedupSettings, FilterSettings, Source
from model.dedup import Deduplicator
from model.filters import QualityFilter
from model.ingest import Document

PROSE = "Le conseil municipal a voté le budget de la médiathèque après un long débat public."


def _filter(tmp_path: Path, **settings) -> QualityFilter:
    (tmp_path / "domains.txt").write_text("# blocked\nbad.example\n\nadult.example  # comment\n")
    (tmp_path / "banned-fr.txt").write_text("gros mot\nvilain\n")
    filters = FilterSettings(url_blocklist=[tmp_path / "domains.txt"], banned_words={"fr": tmp_path / "banned-fr.txt"},
                             **settings)
    return QualityFilter(Source("s", "fr", "CC0-1.0", 1.0, dt.date(2020, 1, 1), dt.date(2022, 12, 31), [], None,
                                "text", "url", "date", filters))


def _doc(text: str = PROSE, url: str | None = None, day: dt.date = dt.date(2021, 6, 1)) -> Document:
    return Document(text, day, url, "test")


def test_each_quality_check_names_its_reason(tmp_path: Path) -> None:
    check = _filter(tmp_path, max_chars=200)
    assert check.reason(_doc()) is None
    assert check.reason(_doc(day=dt.date(2019, 12, 31))) == "date_outside_range"
    assert check.reason(_doc(url="https://www.bad.example/page")) == "blocked_url"  # subdomains too
    assert check.reason(_doc(url="https://notbad.example/page")) is None
    assert check.reason(_doc(url="adult.example/x")) == "blocked_url"
    assert check.reason(_doc("Court.")) == "too_short"
    assert check.reason(_doc(PROSE * 3)) == "too_long"
    assert check.reason(_doc("anticonstitutionnellement,incontestablement")) == "too_few_words"
    assert check.reason(_doc("|| -- ## :: ** %% @@ ++ == ~~ ^^ <> {} [] ;;")) == "low_alpha_ratio"
    assert check.reason(_doc("Les numéros gagnants 12345678 90123456 sont")) == "high_digit_ratio"
    assert check.reason(_doc(PROSE + " Quel VILAIN personnage.")) == "banned_words"
    assert check.reason(_doc(PROSE + " Un gros mot.")) == "banned_words"
    assert check.reason(_doc(PROSE + " Les vilainement écrits restent.")) is None  # whole words only


def test_a_banned_word_allowance_and_languages_without_a_list(tmp_path: Path) -> None:
    lenient = _filter(tmp_path, max_banned_words=1)
    assert lenient.reason(_doc(PROSE + " vilain")) is None
    assert lenient.reason(_doc(PROSE + " vilain vilain")) == "banned_words"
    english = QualityFilter(dataclasses.replace(lenient.source, language="en"))
    assert english.reason(_doc(PROSE + " vilain vilain")) is None


def test_exact_and_near_duplicates_are_removed_and_distinct_texts_kept(tmp_path: Path) -> None:
    rng = random.Random(0)
    words = [f"mot{i}" for i in range(500)]
    texts = [" ".join(rng.choice(words) for _ in range(200)) for _ in range(50)]
    dedup = Deduplicator(DedupSettings(near_threshold=0.8))
    assert [dedup.reason(t) for t in texts] == [None] * 50
    assert dedup.reason("  " + texts[3] + "\n") == "exact_duplicate"
    near = texts[7].split()
    near[100] = "changé"
    assert dedup.reason(" ".join(near)) == "near_duplicate"
    far = texts[9].split()
    far[::2] = [rng.choice(words) for _ in far[::2]]  # half the words replaced
    assert dedup.reason(" ".join(far)) is None


def test_dedup_can_be_switched_off(tmp_path: Path) -> None:
    dedup = Deduplicator(DedupSettings(exact=False, near_threshold=0))
    assert [dedup.reason("same text here") for _ in range(3)] == [None, None, None]
