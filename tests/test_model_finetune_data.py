"""A site's private data and the LoRA adapters it trains: checked input, exact exchange, learning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model.checkpoints import load_model, read_checkpoint
from model.instructions import IGNORE, PROMPT, InstructionDataError, Pair, read_pairs, split_pairs, tokenize_pairs, write_pairs
from model.lora import (
    LoraSettings, adapter_arrays, adapter_parameters, answer_loss, arrays_digest, attach_lora, load_adapter_arrays,
    load_adapter_parameters, train_adapter,
)
from model.sample_instructions import site_pairs, stand_in_checkpoint


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pairs = site_pairs("energy", 200)
    return stand_in_checkpoint(tmp_path_factory.mktemp("base"), [PROMPT.format(instruction=p.instruction) + p.answer
                                                                 for p in pairs])


@pytest.mark.parametrize("line, complaint", [
    ('{"instruction": "q", "answer": "a"', "not valid JSON"),
    ('["q", "a"]', "a JSON list, not an object"),
    ('{"instruction": "q"}', "no 'answer' text"),
    ('{"instruction": "  ", "answer": "a"}', "no 'instruction' text"),
])
def test_a_malformed_line_is_refused_with_its_file_and_line(tmp_path: Path, line: str, complaint: str) -> None:
    data = tmp_path / "site.jsonl"
    data.write_text('{"instruction": "q", "answer": "a"}\n\n' + line + "\n")
    with pytest.raises(InstructionDataError, match=f"site.jsonl:3: {complaint}"):
        read_pairs(data)


def test_missing_empty_and_non_utf8_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InstructionDataError, match="no such file"):
        read_pairs(tmp_path / "absent.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InstructionDataError, match="no instruction/answer pairs"):
        read_pairs(tmp_path / "empty.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes('{"instruction": "é", "answer": "a"}\n'.encode("latin-1"))
    with pytest.raises(InstructionDataError, match="not UTF-8"):
        read_pairs(tmp_path / "latin1.jsonl")


def test_pairs_round_trip_and_every_tenth_is_held_out(tmp_path: Path) -> None:
    pairs = site_pairs("bank", 25)
    write_pairs(tmp_path / "bank.jsonl", pairs)
    assert read_pairs(tmp_path / "bank.jsonl") == pairs
    train, held_out = split_pairs(pairs)
    assert held_out == [pairs[9], pairs[19]] and len(train) == 23 and not set(map(id, held_out)) & set(map(id, train))


def test_the_loss_is_taken_on_answer_tokens_only(base: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(base)
    examples = tokenize_pairs([Pair("Quel est le prix ?", "Dix centimes."), Pair("Q ?", "R.")], tokenizer, 64)
    answer = tokenizer.encode("Dix centimes.", add_special_tokens=False) + [tokenizer.eos_token_id]
    labels = examples.labels[0][examples.labels[0] != IGNORE].tolist()
    assert labels == answer
    assert examples.attention_mask[1].sum() < examples.attention_mask[0].sum()  # the short pair is padded


def test_adapters_travel_exactly_and_refuse_other_lora_settings(base: Path) -> None:
    checkpoint = read_checkpoint(base)
    sender = attach_lora(load_model(checkpoint), LoraSettings(rank=4), seed=1)
    arrays = [a + np.float32(0.01) for a in adapter_arrays(sender)]
    receiver = attach_lora(load_model(checkpoint), LoraSettings(rank=4), seed=2)
    load_adapter_arrays(receiver, arrays)
    assert all(np.array_equal(a, b) for a, b in zip(adapter_arrays(receiver), arrays))
    with pytest.raises(ValueError, match="shape"):
        load_adapter_arrays(attach_lora(load_model(checkpoint), LoraSettings(rank=8)), arrays)
    with pytest.raises(ValueError, match="other LoRA settings"):
        load_adapter_arrays(attach_lora(load_model(checkpoint), LoraSettings(rank=4, target_modules=("q_proj",))), arrays)

    # On the wire the adapter is one vector: the same values, the same digest, refused by other settings.
    load_adapter_arrays(receiver, adapter_arrays(attach_lora(load_model(checkpoint), LoraSettings(rank=4), seed=3)))
    parameters = adapter_parameters(sender)
    assert len(parameters) == 1 and parameters[0].ndim == 1
    assert arrays_digest(parameters) == arrays_digest(adapter_arrays(sender))
    load_adapter_parameters(receiver, parameters)
    assert all(np.array_equal(a, b) for a, b in zip(adapter_arrays(receiver), adapter_arrays(sender)))
    for other in (LoraSettings(rank=8), LoraSettings(rank=4, target_modules=("q_proj",))):
        with pytest.raises(ValueError, match="other LoRA settings"):
            load_adapter_parameters(attach_lora(load_model(checkpoint), other), parameters)
    with pytest.raises(ValueError, match="one adapter vector"):
        load_adapter_parameters(receiver, adapter_arrays(sender))


def test_training_the_adapter_lowers_the_held_out_loss_and_leaves_the_base_untouched(base: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    checkpoint = read_checkpoint(base)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base)
    train, held_out = split_pairs(site_pairs("energy", 200))
    model = attach_lora(load_model(checkpoint), LoraSettings())
    held_out_examples = tokenize_pairs(held_out, tokenizer, 96)
    before = answer_loss(model, held_out_examples)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train_adapter(model, tokenize_pairs(train, tokenizer, 96), steps=60, batch_size=8, learning_rate=5e-3, seed=0)
    assert answer_loss(model, held_out_examples) < before - 0.5
    assert all((p == base_weights[n]).all() for n, p in model.named_parameters() if not p.requires_grad)
