"""A fine-tuning site's private data: JSONL instruction/answer pairs, checked, and their tokenized examples.

One object per line: {"instruction": "...", "answer": "..."} (other keys are
ignored). A file that is missing, empty or has one malformed line is refused
as a whole, naming the file and line: a site should not train on half its data
without knowing it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

PROMPT = "### Question:\n{instruction}\n### Answer:\n"
IGNORE = -100  # label of prompt and padding tokens: the loss is taken on answers only


class InstructionDataError(ValueError):
    """A site's data file that cannot be used; the message names the file, the line and what to fix."""


@dataclass(frozen=True)
class Pair:
    instruction: str
    answer: str


def read_pairs(path: Path) -> list[Pair]:
    path = Path(path)
    if not path.is_file():
        raise InstructionDataError(
            f"{path}: no such file; give the site's private data as a JSONL file with one "
            '{"instruction": ..., "answer": ...} object per line'
        )
    pairs = []
    try:
        with open(path, encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    pairs.append(_pair(line, f"{path}:{number}"))
    except UnicodeDecodeError as error:
        raise InstructionDataError(f"{path}: not UTF-8 text ({error}); save the file as UTF-8") from None
    if not pairs:
        raise InstructionDataError(f"{path}: no instruction/answer pairs in the file")
    return pairs


def _pair(line: str, where: str) -> Pair:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise InstructionDataError(f"{where}: not valid JSON ({error.msg}); fix or remove the line") from None
    if not isinstance(record, dict):
        raise InstructionDataError(f"{where}: a JSON {type(record).__name__}, not an object with instruction and answer")
    for field in ("instruction", "answer"):
        value = record.get(field)
        if not isinstance(value, str) or not value.strip():
            raise InstructionDataError(f"{where}: no {field!r} text; every line needs non-empty instruction and answer")
    return Pair(record["instruction"], record["answer"])


def write_pairs(path: Path, pairs: list[Pair]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for pair in pairs:
            out.write(json.dumps({"instruction": pair.instruction, "answer": pair.answer}, ensure_ascii=False) + "\n")


def split_pairs(pairs: list[Pair], eval_every: int = 10) -> tuple[list[Pair], list[Pair]]:
    """(train, held out): every eval_every-th pair is held out, so a site evaluates on data it did not train on."""
    held_out = pairs[eval_every - 1::eval_every]
    train = [pair for index, pair in enumerate(pairs) if index % eval_every != eval_every - 1]
    return train, held_out


@dataclass(frozen=True)
class Examples:
    """Tokenized pairs padded to one length: input ids, attention mask, labels (answer tokens only)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.input_ids)

    def select(self, rows: torch.Tensor) -> "Examples":
        return Examples(self.input_ids[rows], self.attention_mask[rows], self.labels[rows])


def tokenize_pairs(pairs: list[Pair], tokenizer, max_tokens: int) -> Examples:  # type: ignore[no-untyped-def]
    """Prompt + answer + </s> per pair, cut at max_tokens; labels ignore the prompt so only answers are learnt."""
    rows, labels = [], []
    for pair in pairs:
        prompt = tokenizer.encode(PROMPT.format(instruction=pair.instruction), add_special_tokens=False)
        answer = tokenizer.encode(pair.answer, add_special_tokens=False) + [tokenizer.eos_token_id]
        ids = ([tokenizer.bos_token_id] + prompt + answer)[:max_tokens]
        rows.append(ids)
        labels.append(([IGNORE] * (1 + len(prompt)) + answer)[:max_tokens])
    length = max(len(ids) for ids in rows)
    pad = tokenizer.pad_token_id

    def padded(values: list[int], fill: int) -> list[int]:
        return values + [fill] * (length - len(values))

    return Examples(
        input_ids=torch.tensor([padded(ids, pad) for ids in rows]),
        attention_mask=torch.tensor([padded([1] * len(ids), 0) for ids in rows]),
        labels=torch.tensor([padded(label, IGNORE) for label in labels]),
    )
