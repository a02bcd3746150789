"""Checkpoints a run resumes from: Hugging Face model + tokenizer, outer optimizer state, round, lineage head.

Layout: DIR/round-000009/ holds config.json + model.safetensors (the global
parameters after round 9's outer step), the tokenizer files, outer_state.pt
(outer Nesterov momentum) and checkpoint.json (run id, next round, lineage head,
the run config in force). DIR/latest names the newest. Each checkpoint is
written to a temporary directory and renamed, so it is whole or absent.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from google.protobuf.json_format import MessageToDict
from transformers import AutoModelForCausalLM

from model.tokenizer import tokenizer_from_json
from protocol import essaim_pb2 as pb
from worker.diloco import DiLoCoTrainer, tensors_digest

LATEST = "latest"


class CheckpointError(Exception):
    """A checkpoint that cannot be resumed from; the message says why."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    next_round: int          # the round a resumed worker trains first
    run_id: str
    lineage_head: int        # the newest lineage record this checkpoint's weights include
    params_digest: str


def save_checkpoint(
    directory: Path, trainer: DiLoCoTrainer, config: pb.RunConfig, lineage_head: int
) -> Path:
    """Write the trainer's state after its last outer step as DIR/round-NNNNNN and point DIR/latest at it."""
    completed = trainer.round - 1
    final = directory / f"round-{completed:06d}"
    partial = directory / f".{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    trainer.model.save_pretrained(partial)  # local parameters equal the global ones after an outer step
    tokenizer_from_json(config.tokenizer_json).save_pretrained(partial)
    torch.save({"momentum": [m.clone() for m in trainer.momentum]}, partial / "outer_state.pt")
    run_config = MessageToDict(config, preserving_proto_field_name=True)
    for bulky in ("tokenizer_json", "initial_peers"):
        run_config.pop(bulky, None)
    (partial / "checkpoint.json").write_text(
        json.dumps(
            {
                "run_id": config.run_id, "completed_round": completed, "next_round": trainer.round,
                "lineage_head": lineage_head, "params_digest": trainer.params_digest(),
                "config_version": "genesis", "run_config": run_config,
            },
            indent=2,
        )
    )
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    _write_atomically(directory / LATEST, final.name)
    return final


def latest_checkpoint(directory: Path) -> Path | None:
    pointer = directory / LATEST
    if not pointer.exists():
        return None
    path = directory / pointer.read_text().strip()
    if not (path / "checkpoint.json").exists():
        raise CheckpointError(f"{pointer} names {path.name}, which is not a complete checkpoint")
    return path


def read_checkpoint(path: Path) -> Checkpoint:
    try:
        info = json.loads((path / "checkpoint.json").read_text())
        return Checkpoint(
            path=path, next_round=int(info["next_round"]), run_id=str(info["run_id"]),
            lineage_head=int(info["lineage_head"]), params_digest=str(info["params_digest"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path}: unreadable checkpoint.json ({error})") from None


def load_model(checkpoint: Checkpoint) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(checkpoint.path)
    digest = tensors_digest([p for p in model.parameters() if p.requires_grad])
    if digest != checkpoint.params_digest:
        raise CheckpointError(
            f"{checkpoint.path}: the model weights do not match the digest recorded with them "
            "(modified or corrupted files); resume from another checkpoint or from the swarm"
        )
    return model


def restore_outer_state(trainer: DiLoCoTrainer, checkpoint: Checkpoint, round_started_at: float) -> None:
    """Give a trainer built on load_model(checkpoint) the checkpoint's round and outer momentum."""
    state = torch.load(checkpoint.path / "outer_state.pt", weights_only=True)
    trainer.load_outer_state(
        checkpoint.next_round, [p.detach().clone() for p in trainer.global_params] + list(state["momentum"]),
        round_started_at,
    )


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
