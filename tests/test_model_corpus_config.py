"""The corpus config is refused with the file, line and field at fault, before anything is read."""

import datetime as dt
from pathlib import Path

import pytest

from model.corpus_config import CorpusConfigError, load_corpus_config

VALID = """[[source]]
name = "w"
language = "fr"
licence = "CC0-1.0"
weight = 1.0
date_from = 2020-01-01
date_to = 2021-12-31
paths = ["a.txt"]
"""


def _write(tmp_path: Path, body: str) -> Path:
    (tmp_path / "a.txt").write_text("du texte\n", encoding="utf-8")
    config = tmp_path / "corpus.toml"
    config.write_text(body, encoding="utf-8")
    return config


def test_a_valid_config_resolves_paths_dates_and_default_filters(tmp_path: Path) -> None:
    corpus = load_corpus_config(_write(tmp_path, "[filters]\nmin_chars = 5\n\n" + VALID))
    [source] = corpus.sources
    assert source.paths == [tmp_path / "a.txt"]
    assert (source.date_from, source.date_to) == (dt.date(2020, 1, 1), dt.date(2021, 12, 31))
    assert source.filters.min_chars == 5 and source.filters.min_words == 3
    assert corpus.settings.on_bad_record == "skip" and corpus.dedup.near_threshold == 0.8


def test_a_source_without_licence_is_refused_with_its_line(tmp_path: Path) -> None:
    second = VALID.replace('"w"', '"wiki-fr"').replace('licence = "CC0-1.0"\n', "")
    config = _write(tmp_path, VALID + "\n" + second)
    with pytest.raises(CorpusConfigError, match=r"corpus\.toml:10 \(source #2 'wiki-fr'\): no licence: licence = "):
        load_corpus_config(config)


def test_the_american_spelling_of_licence_gets_a_hint(tmp_path: Path) -> None:
    with pytest.raises(CorpusConfigError, match="spelled 'licence'"):
        load_corpus_config(_write(tmp_path, VALID.replace("licence", "license")))


@pytest.mark.parametrize(
    "change, message",
    [
        (("weight = 1.0", "weight = -1"), "weight: Input should be greater than or equal to 0"),
        (("date_to = 2021-12-31", "date_to = 2019-12-31"), "date_to 2019-12-31 is before date_from"),
        (('name = "w"', 'name = "a b"'), "name: String should match pattern"),
        (('paths = ["a.txt"]', 'paths = ["gone.txt"]'), r"gone\.txt does not exist"),
        (("weight = 1.0", "weight = 0"), "every source has weight 0"),
        (('paths = ["a.txt"]', 'paths = ["a.txt"]\nformat = "csv"'), "format: Input should be"),
    ],
)
def test_bad_values_are_refused_naming_the_field(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    with pytest.raises(CorpusConfigError, match=message):
        load_corpus_config(_write(tmp_path, VALID.replace(*change)))


def test_two_sources_with_one_name_and_a_missing_filter_list_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CorpusConfigError, match="two sources are named 'w'"):
        load_corpus_config(_write(tmp_path, VALID + VALID))
    with pytest.raises(CorpusConfigError, match=r"corpus\.toml:1 \(source 'w'\): filter list .*nope\.txt does not exist"):
        load_corpus_config(_write(tmp_path, VALID + '[source.filters]\nurl_blocklist = ["nope.txt"]\n'))


def test_a_source_can_override_one_filter_threshold(tmp_path: Path) -> None:
    corpus = load_corpus_config(_write(tmp_path, VALID + "[source.filters]\nmin_alpha_ratio = 0.2\n"))
    assert corpus.sources[0].filters.min_alpha_ratio == 0.2
    with pytest.raises(CorpusConfigError, match=r"\[source.filters\]: min_alpha_ratio"):
        load_corpus_config(_write(tmp_path, VALID + "[source.filters]\nmin_alpha_ratio = 2\n"))
