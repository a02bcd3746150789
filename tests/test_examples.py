from pathlib import Path

from coordinator.config import load_run_settings
from model.corpus import load_corpus_config, prepare_corpus

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_example_run_settings_load_and_define_a_lease_size() -> None:
    settings = load_run_settings(EXAMPLES / "run.toml")
    assert settings.tokens_per_round == settings.inner_steps * settings.batch_size * settings.seq_len > 0


def test_example_corpus_prepares(tmp_path: Path) -> None:
    sources = load_corpus_config(EXAMPLES / "corpus.toml")
    manifest = prepare_corpus(sources, tmp_path, vocab_size=300, shard_tokens=1000)
    assert {shard.language for shard in manifest.shards} == {"fr", "en"}
    assert all(shard.licence == "CC0-1.0" for shard in manifest.shards)


def test_run_settings_refuse_unknown_keys(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("inner_lr = 0.001\ninner_lrr = 0.002\n")
    try:
        load_run_settings(path)
    except ValueError as error:
        assert "inner_lrr" in str(error)
    else:
        raise AssertionError("a misspelt key was accepted")
