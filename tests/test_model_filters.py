"""Quality filters and reservation lists: each removes what it should, and says why."""

import dataclasses
import datetime as dt
import random
from pathlib import Path

from model.corpus_config import FilterSettings, Source
from model.filters import QualityFilter, letters_and_digits
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


def test_text_and_data_mining_reservations_remove_their_domains_and_url_patterns(tmp_path: Path) -> None:
    (tmp_path / "reserved.txt").write_text("# rightsholders' opt-outs\nlemonde.example\nnews.example/archives/*\n"
                                           "*.blog.example/private/*\n")
    check = _filter(tmp_path, tdm_opt_outs=[tmp_path / "reserved.txt"])
    assert check.opt_outs.entries == 3
    assert check.reason(_doc(url="https://www.lemonde.example/article")) == "tdm_opt_out"  # subdomains too
    assert check.reason(_doc(url="https://News.example/archives/2021/x?page=2")) == "tdm_opt_out"
    assert check.reason(_doc(url="https://news.example/today")) is None  # only the reserved path
    assert check.reason(_doc(url="http://anne.blog.example/private/1")) == "tdm_opt_out"
    assert check.reason(_doc(url="http://anne.blog.example/public/1")) is None
    assert check.reason(_doc(url=None)) is None  # without a URL nothing can be matched
    # A reservation outranks the other filters: it is counted as what it is.
    assert check.reason(_doc("Court.", url="https://lemonde.example/")) == "tdm_opt_out"


def test_letters_and_digits_are_counted_as_str_isalpha_and_str_isdigit_count_them() -> None:
    rng = random.Random(4)
    texts = ["", "Élève de 2ᵉ : ² ½ ٣ 𝟙 𝒜 😀 \ud800 ok", "".join(chr(rng.randrange(0x110000)) for _ in range(50_000))]
    for text in texts:
        assert letters_and_digits(text) == (sum(map(str.isalpha, text)), sum(map(str.isdigit, text)))
