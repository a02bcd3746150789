"""Reading checkpoints: what a checkpoint directory claims (checkpoint.json) and its weights, verified.

Layout: DIR/round-000009/ holds config.json + model.safetensors (the global
parameters after round 9's outer step), the tokenizer files, outer_state.pt
(outer Nesterov momentum) and checkpoint.json (run id, completed and next round,
lineage head, params digest, the run config in force, when it was saved).
DIR/latest names the newest. Workers write them (worker.checkpoint); workers,
auditors and model cards read them through this module.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

LATEST = "latest"


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message says why."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    completed_round: int     # the last round whose outer step these weights include
    next_round: int          # the round a resumed worker trains first
    run_id: str
    lineage_head: int        # the newest lineage record id its worker had seen when saving
    params_digest: str
    config_version: str
    run_config: dict
    saved_at: float          # seconds since the epoch


def tensors_digest(tensors: list[torch.Tensor]) -> str:
    """sha256 over the tensors' bytes, in order: equal digests mean bit-identical parameters.

    Any device and dtype (bf16 has no numpy twin): the bytes are read as uint8 on the host.
    """
    digest = hashlib.sha256()
    for tensor in tensors:
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_checkpoint_files(
    directory: Path, model: torch.nn.Module, tokenizer, info: dict  # type: ignore[no-untyped-def]
) -> None:
    """Weights, tokenizer and checkpoint.json (info + the weights' digest) into a directory that exists."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    digest = tensors_digest([p for p in model.parameters() if p.requires_grad])
    (directory / "checkpoint.json").write_text(json.dumps({**info, "params_digest": digest}, indent=2))


def latest_checkpoint(directory: Path) -> Path | None:
    pointer = directory / LATEST
    if not pointer.exists():
        return None
    path = directory / pointer.read_text().strip()
    if not (path / "checkpoint.json").exists():
        raise CheckpointError(f"{pointer} names {path.name}, which is not a complete checkpoint")
    return path


def read_checkpoint(path: Path) -> Checkpoint:
    path = Path(path)
    try:
        info = json.loads((path / "checkpoint.json").read_text())
        return Checkpoint(
            path=path, completed_round=int(info["completed_round"]), next_round=int(info["next_round"]),
            run_id=str(info["run_id"]), lineage_head=int(info["lineage_head"]),
            params_digest=str(info["params_digest"]), config_version=str(info["config_version"]),
            run_config=dict(info["run_config"]),
            saved_at=float(info.get("saved_at", (path / "checkpoint.json").stat().st_mtime)),
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path}: unreadable checkpoint.json ({error}); is it a checkpoint directory?") from None


def load_model(checkpoint: Checkpoint) -> torch.nn.Module:
    """The checkpoint's model, refused if its weights do not hash to the recorded digest."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint.path)
    digest = tensors_digest([p for p in model.parameters() if p.requires_grad])
    if digest != checkpoint.params_digest:
        raise CheckpointError(
            f"{checkpoint.path}: the model weights do not match the digest recorded with them "
            "(modified or corrupted files); resume from another checkpoint or from the swarm"
        )
    return model
