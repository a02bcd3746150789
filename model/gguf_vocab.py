"""An Essaim tokenizer as GGUF vocabulary metadata: llama.cpp's "gpt2" (byte-level BPE) model.

llama.cpp rebuilds the tokenizer from the token list, their types, the merges and a
pre-tokenizer name it knows. Essaim's tokenizer (model.tokenizer) is a byte-level BPE
whose pre-tokenizer is ByteLevel with GPT-2's split regex and no prefix space: that is
llama.cpp's "gpt-2" pre-tokenizer, so a tokenizer of another shape is refused rather
than exported to split text differently. Ids the model has beyond the tokenizer's
become unused "[PADn]" tokens, as llama.cpp's converter writes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf

PRE_TOKENIZER = "gpt-2"  # llama.cpp's name for GPT-2's split regex (LLAMA_VOCAB_PRE_TYPE_GPT2)


@dataclass(frozen=True)
class Vocabulary:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special_ids: dict[str, int]  # bos, eos, unk, pad -> id, those the tokenizer names
    add_bos: bool                # whether encoding text puts BOS first (llama.cpp must do the same)
    add_eos: bool

    @property
    def bos_text(self) -> str:
        return self.tokens[self.special_ids["bos"]] if "bos" in self.special_ids else ""

    @property
    def eos_text(self) -> str:
        return self.tokens[self.special_ids["eos"]] if "eos" in self.special_ids else ""

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(PRE_TOKENIZER)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        writer.add_token_merges(self.merges)
        adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
                  "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
        for role, token_id in self.special_ids.items():
            adders[role](token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)


def read_vocabulary(directory: Path, vocab_size: int) -> Vocabulary:
    """The vocabulary of DIR/tokenizer.json for a model of vocab_size ids, checked to be one llama.cpp splits the same."""
    from tokenizers import Tokenizer

    tokenizer_file = directory / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ValueError(f"{directory}: no tokenizer.json; a checkpoint carries its tokenizer (Essaim writes it "
                         "beside the weights): copy the run's tokenizer/ files into this directory")
    document = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    _check_byte_level(directory, document)
    tokens: dict[int, str] = {index: token for token, index in document["model"]["vocab"].items()}
    types = {index: gguf.TokenType.NORMAL for index in tokens}
    for added in document.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if max(tokens) >= vocab_size:
        raise ValueError(f"{directory}: the tokenizer has id {max(tokens)} but the model only {vocab_size} embeddings; "
                         "the tokenizer does not belong to this checkpoint")
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in document["model"]["merges"]]
    special_ids = _special_ids(directory, {token: index for index, token in tokens.items()})
    probe = Tokenizer.from_str(json.dumps(document)).encode("a").ids
    return Vocabulary(
        tokens=[tokens.get(index, f"[PAD{index}]") for index in range(vocab_size)],
        types=[int(types.get(index, gguf.TokenType.UNUSED)) for index in range(vocab_size)],
        merges=merges,
        special_ids=special_ids,
        add_bos="bos" in special_ids and probe[:1] == [special_ids["bos"]],
        add_eos="eos" in special_ids and probe[-1:] == [special_ids["eos"]],
    )


def _check_byte_level(directory: Path, document: dict) -> None:
    model, pre, normalizer = document.get("model") or {}, document.get("pre_tokenizer") or {}, document.get("normalizer")
    shape = (f"a {model.get('type')!r} model with pre-tokenizer {pre.get('type')!r} and "
             f"{'normalizer ' + repr(normalizer.get('type')) if normalizer else 'no normalizer'}")
    byte_level = (model.get("type") == "BPE" and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
                  and not pre.get("add_prefix_space") and not normalizer)
    if not byte_level:
        raise ValueError(f"{directory}: the tokenizer is {shape}; GGUF export writes the byte-level BPE Essaim trains "
                         "(BPE, ByteLevel pre-tokenizer with GPT-2's split, no prefix space, no normalizer)")


def _special_ids(directory: Path, ids: dict[str, int]) -> dict[str, int]:
    """bos/eos/unk/pad ids from the names tokenizer_config.json gives them."""
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    special = {}
    for role in ("bos", "eos", "unk", "pad"):
        name = config.get(f"{role}_token")
        name = name.get("content") if isinstance(name, dict) else name
        if name in ids:
            special[role] = ids[name]
    return special
