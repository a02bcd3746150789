"""One site's fine-tuning work: check its checkpoint and data, train the LoRA adapters a round asks for, evaluate.

Everything here stays on the site: the checkpoint, the private data and the
model. What goes back to the server is the adapter (one vector) and a few numbers.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerFast

from model.checkpoints import load_model, read_checkpoint
from model.instructions import Examples, read_pairs, split_pairs, tokenize_pairs
from model.lora import LoraSettings, adapter_parameters, answer_loss, attach_lora, load_adapter_parameters, train_adapter
from protocol.finetune import SiteInstructions


class SiteError(RuntimeError):
    """This site cannot take part in the round; the message says why and what to do."""


@dataclass(frozen=True)
class Site:
    name: str
    data: Path
    checkpoint: Path

    @classmethod
    def from_node_config(cls, node_config: dict) -> "Site":
        missing = [key for key in ("name", "data", "checkpoint") if not node_config.get(key)]
        if missing:
            raise SiteError(
                f"this SuperNode's --node-config lacks {', '.join(missing)}: start it with "
                "`essaim finetune site --name ... --data ... --checkpoint ...`"
            )
        return cls(str(node_config["name"]), Path(str(node_config["data"])), Path(str(node_config["checkpoint"])))


def _model_and_data(site: Site, instructions: SiteInstructions):  # type: ignore[no-untyped-def]
    checkpoint = read_checkpoint(site.checkpoint)
    if checkpoint.params_digest != instructions.base_digest:
        raise SiteError(
            f"site {site.name}: checkpoint {site.checkpoint} has parameters {checkpoint.params_digest[:16]}…, "
            f"but this run fine-tunes {instructions.base_digest[:16]}…; copy the run's base checkpoint "
            "to this site and give it with --checkpoint"
        )
    model = load_model(checkpoint)  # refuses weights that do not match their own digest
    tokenizer = PreTrainedTokenizerFast.from_pretrained(checkpoint.path)
    train, held_out = split_pairs(read_pairs(site.data))
    lora = LoraSettings(
        rank=instructions.lora_rank, alpha=instructions.lora_alpha,
        target_modules=tuple(instructions.lora_targets.split(",")),
    )
    peft_model = attach_lora(model, lora)
    return peft_model, tokenizer, train, held_out


def train_round(site: Site, instructions: SiteInstructions, arrays: list[np.ndarray]) -> tuple[list[np.ndarray], int, float]:
    """(the adapter after local training, examples trained on, mean training loss) for this round."""
    model, tokenizer, train, _ = _model_and_data(site, instructions)
    load_adapter_parameters(model, arrays)
    examples: Examples = tokenize_pairs(train, tokenizer, instructions.max_tokens)
    loss = train_adapter(
        model, examples, instructions.local_steps, instructions.batch_size, instructions.learning_rate,
        seed=zlib.crc32(f"{site.name}/{instructions.server_round}".encode()),
    )
    return adapter_parameters(model), len(examples), loss


def evaluate_round(site: Site, instructions: SiteInstructions, arrays: list[np.ndarray]) -> tuple[float, int]:
    """(answer loss of the adapter on this site's held-out pairs, how many pairs)."""
    model, tokenizer, _, held_out = _model_and_data(site, instructions)
    if not held_out:
        raise SiteError(f"site {site.name}: fewer than 10 pairs in {site.data}, so none is held out to evaluate on")
    load_adapter_parameters(model, arrays)
    return answer_loss(model, tokenize_pairs(held_out, tokenizer, instructions.max_tokens)), len(held_out)
