"""LoRA adapters on a community checkpoint: attach, exchange as arrays, train, evaluate, save and merge.

Only the adapter's tensors (lora_A, lora_B of the target projections) ever
leave a site; they travel as a list of float32 arrays in a fixed order (sorted
parameter names), so every site and the server agree on what each array is.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from model.instructions import Examples

ADAPTER_FILE = "adapter_model.safetensors"


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


def attach_lora(model: torch.nn.Module, settings: LoraSettings, seed: int = 0) -> PeftModel:
    """The model with fresh LoRA adapters (B = 0, so it starts equal to the base); only the adapters train."""
    torch.manual_seed(seed)  # lora_A's initialisation: every party building the start adapter gets the same one
    config = LoraConfig(
        r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules), task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def adapter_arrays(model: PeftModel) -> list[np.ndarray]:
    state = get_peft_model_state_dict(model)
    return [state[name].detach().cpu().float().numpy().copy() for name in sorted(state)]


def load_adapter_arrays(model: PeftModel, arrays: list[np.ndarray]) -> None:
    expected = get_peft_model_state_dict(model)
    names = sorted(expected)
    if len(arrays) != len(names):
        raise ValueError(
            f"got {len(arrays)} adapter arrays for {len(names)} adapter tensors: "
            "the sender used other LoRA settings (rank or target modules)"
        )
    state = {name: torch.from_numpy(np.asarray(array, dtype=np.float32)) for name, array in zip(names, arrays)}
    for name in names:
        if tuple(state[name].shape) != tuple(expected[name].shape):
            raise ValueError(f"adapter tensor {name}: shape {tuple(state[name].shape)}, expected {tuple(expected[name].shape)}")
    set_peft_model_state_dict(model, state)


def adapter_parameters(model: PeftModel) -> list[np.ndarray]:
    """What travels between sites and server: the adapter tensors, in name order, as one flat float32 vector.

    Flower sends each array as its own object, pulled and hashed one by one; a
    model's dozens of LoRA tensors cost over a second per message on 2 cores, one
    vector a few milliseconds. Averaging, clipping and masking are elementwise, so
    nothing else changes, and arrays_digest gives the same digest for both forms.
    """
    return [np.concatenate([array.ravel() for array in adapter_arrays(model)])]


def load_adapter_parameters(model: PeftModel, parameters: list[np.ndarray]) -> None:
    """Load adapter_parameters into the model's LoRA tensors (same settings, same order)."""
    if len(parameters) != 1:
        raise ValueError(f"got {len(parameters)} arrays where one adapter vector was expected: "
                         "the sender runs an Essaim that sends one array per tensor; upgrade it")
    vector = parameters[0]
    shapes = [tuple(tensor.shape) for _, tensor in sorted(get_peft_model_state_dict(model).items())]
    sizes = [int(np.prod(shape)) for shape in shapes]
    if vector.ndim != 1 or vector.size != sum(sizes):
        raise ValueError(
            f"got an adapter of {vector.size} parameters (shape {vector.shape}) where this model's LoRA adapters "
            f"hold {sum(sizes)}: the sender used other LoRA settings (rank or target modules)"
        )
    pieces = np.split(np.asarray(vector, dtype=np.float32), np.cumsum(sizes)[:-1])
    load_adapter_arrays(model, [piece.reshape(shape) for piece, shape in zip(pieces, shapes)])


def arrays_digest(arrays: list[np.ndarray]) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
    return digest.hexdigest()


def train_adapter(
    model: PeftModel, examples: Examples, steps: int, batch_size: int, learning_rate: float, seed: int
) -> float:
    """AdamW on the adapters for `steps` minibatches drawn at random; returns the mean training loss."""
    model.train()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    losses = []
    for _ in range(steps):
        rows = torch.randint(len(examples), (min(batch_size, len(examples)),), generator=generator)
        batch = examples.select(rows)
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return sum(losses) / len(losses)


@torch.no_grad()
def answer_loss(model: torch.nn.Module, examples: Examples, batch_size: int = 16) -> float:
    """Mean cross-entropy per answer token (prompt and padding excluded)."""
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = examples.select(torch.arange(start, min(start + batch_size, len(examples))))
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        labels = batch.labels[:, 1:]
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
        ).item()
        tokens += int((labels != -100).sum())
    return total / tokens if tokens else math.nan


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
