"""`essaim demo`, small: it trains, saves a loadable checkpoint, and leaves nothing running."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from essaim.processes import essaim_command
from model.checkpoints import latest_checkpoint, read_checkpoint

pytestmark = pytest.mark.e2e


def processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if entry.name.isdigit() and text in cmdline:
            found.append(cmdline)
    return found


def test_demo_runs_end_to_end_and_cleans_up(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    result = subprocess.run(
        essaim_command("demo", "--workdir", str(workdir), "--workers", "2", "--rounds", "2", "--finetune-rounds", "1"),
        capture_output=True, text=True, timeout=500,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    printed = " ".join(result.stdout.split())  # rich wraps long lines
    languages = re.search(r"tokens by language: (.*?) tokens by source", printed).group(1)
    assert {part.split()[0] for part in languages.split(", ")} == {"code", "en", "fr"}
    before, after = map(float, re.search(r"sample: ([\d.]+) before, ([\d.]+) after 2 rounds", printed).groups())
    assert after < before
    # A validator ran beside the workers: every token is unverified or verified, none rejected.
    assert re.search(r"tokens by what the validator's replays found: unverified [\d,]+, verified [\d,]+, rejected 0 ",
                     printed), printed[-2000:]
    checkpoint = latest_checkpoint(workdir / "checkpoint")
    AutoModelForCausalLM.from_pretrained(checkpoint)
    AutoTokenizer.from_pretrained(checkpoint)
    # The second act fine-tuned that checkpoint on three sites and says where the merged model is.
    record = json.loads((workdir / "finetune" / "tuned" / "finetune.json").read_text())
    assert record["sites"] == ["bank", "energy-utility", "hospital"]
    assert record["base"]["path"] == str(checkpoint)
    assert record["base"]["params_digest"] == read_checkpoint(checkpoint).params_digest
    assert "held-out answer loss after the last round" in printed
    assert (workdir / "finetune" / "tuned" / "merged" / "MODEL_CARD.md").is_file()
    assert processes_mentioning(str(workdir)) == []
