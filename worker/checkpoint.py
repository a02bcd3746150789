"""Writing the checkpoints a run resumes from, and restoring a trainer's outer state from one.

The layout is model.checkpoints'. Each checkpoint is written to a temporary
directory and renamed, so it is whole or absent.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch
from google.protobuf.json_format import MessageToDict

from model.checkpoints import LATEST, Checkpoint, write_checkpoint_files
from model.tokenizer import tokenizer_from_json
from protocol import essaim_pb2 as pb
from worker.diloco import DiLoCoTrainer


def save_checkpoint(
    directory: Path, trainer: DiLoCoTrainer, config: pb.RunConfig, lineage_head: int, config_version: str
) -> Path:
    """Write the trainer's state after its last outer step as DIR/round-NNNNNN and point DIR/latest at it."""
    completed = trainer.round - 1
    final = directory / f"round-{completed:06d}"
    partial = directory / f".{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    outer_state = {"momentum": [m.clone() for m in trainer.momentum]}
    residuals = trainer.averager.residuals
    if residuals is not None:  # error feedback: what compression has not sent yet is part of the run's state
        outer_state["residuals"] = [r.clone() for r in residuals]
    torch.save(outer_state, partial / "outer_state.pt")
    run_config = MessageToDict(config, preserving_proto_field_name=True)
    for bulky in ("tokenizer_json", "initial_peers"):
        run_config.pop(bulky, None)
    # The local parameters equal the global ones after an outer step.
    write_checkpoint_files(partial, trainer.model, tokenizer_from_json(config.tokenizer_json), {
        "run_id": config.run_id, "completed_round": completed, "next_round": trainer.round,
        "lineage_head": lineage_head, "config_version": config_version, "run_config": run_config, "saved_at": time.time(),
    })
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    _write_atomically(directory / LATEST, final.name)
    return final


def restore_outer_state(trainer: DiLoCoTrainer, checkpoint: Checkpoint, round_started_at: float) -> None:
    """Give a trainer built on load_model(checkpoint) the checkpoint's round, outer momentum and, when both
    use error feedback, the residuals it had not sent yet."""
    state = torch.load(checkpoint.path / "outer_state.pt", weights_only=True)
    trainer.load_outer_state(
        checkpoint.next_round, [p.detach().clone() for p in trainer.global_params] + list(state["momentum"]),
        round_started_at,
    )
    residuals = trainer.averager.residuals
    if residuals is not None and "residuals" in state:
        trainer.load_residuals(list(state["residuals"]))


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
