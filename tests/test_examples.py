import re
import shlex
import subprocess
from pathlib import Path

from coordinator.config import load_run_settings
from essaim.processes import essaim_command
from model.corpus import prepare_corpus
from model.corpus_config import load_corpus_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
README = EXAMPLES.parent / "README.md"


def test_example_run_settings_load_and_define_a_lease_size() -> None:
    settings = load_run_settings(EXAMPLES / "run.toml")
    assert settings.tokens_per_round == settings.inner_steps * settings.batch_size * settings.seq_len > 0


def test_example_corpus_prepares_and_filters_what_it_says(tmp_path: Path) -> None:
    manifest, report = prepare_corpus(load_corpus_config(EXAMPLES / "corpus.toml"), tmp_path, vocab_size=300,
                                      shard_tokens=1000)
    assert {shard.language for shard in manifest.shards} == {"fr", "en"}
    assert all(shard.licence == "CC0-1.0" for shard in manifest.shards)
    articles = report.sources["my-french-articles"]
    assert (articles.kept_documents, set(articles.removed)) == (3, {"blocked_url", "exact_duplicate"})


def test_run_settings_refuse_unknown_keys(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("inner_lr = 0.001\ninner_lrr = 0.002\n")
    try:
        load_run_settings(path)
    except ValueError as error:
        assert "inner_lrr" in str(error)
    else:
        raise AssertionError("a misspelt key was accepted")


def test_the_gpu_partition_example_is_what_the_readmes_hpc_submit_command_writes() -> None:
    # The README's command, run as written with --dry-run; the example runs `essaim` from the nodes' PATH.
    [command] = re.findall(r"^essaim hpc submit --coordinator .*?[^\\]$", README.read_text(), re.MULTILINE | re.DOTALL)
    args = shlex.split(command.replace("\\\n", " "))[1:]
    result = subprocess.run(essaim_command(*args, "--dry-run"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    written = result.stdout.replace(shlex.join(essaim_command()), "essaim")
    assert (EXAMPLES / "slurm-gpu.sbatch").read_text() == written


def test_a_slurm_job_with_a_malformed_walltime_is_refused() -> None:
    import pytest

    from coordinator.hpc import SlurmError, SlurmJob

    with pytest.raises(SlurmError, match="write the walltime as HH:MM:SS"):
        SlurmJob(coordinator="c:1", partition="p", nodes=1, time="20h", workdir=Path("w"))
