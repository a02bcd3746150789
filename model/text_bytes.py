"""How many bytes of text each token id stands for: what turns a loss per token into bits per byte.

Bits per byte compare models across tokenizers: the same text costs the same bytes,
whatever tokens it is cut into. The tokenizers here are byte-level BPE (model/tokenizer.py),
whose vocabulary writes each byte as one character, so a token's byte count is the length
of its string. A special token written in a text ("<s>") stands for its own characters;
the end-of-document token that preparation appends between documents stands for none.
"""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from model.tokenizer import EOS_ID


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """An int64 array: the UTF-8 bytes each token id decodes to (EOS: 0)."""
    vocabulary = tokenizer.get_vocab(with_added_tokens=True)
    added = {token.content for token in tokenizer.get_added_tokens_decoder().values()}
    lengths = np.zeros(max(vocabulary.values()) + 1, dtype=np.int64)
    for token, token_id in vocabulary.items():
        # An added token is matched in the text as written; a vocabulary token is one character per byte.
        lengths[token_id] = len(token.encode("utf-8")) if token in added else len(token)
    lengths[EOS_ID] = 0
    return lengths


def text_bytes(lengths: np.ndarray, tokens: np.ndarray) -> int:
    """The UTF-8 bytes of the text ``tokens`` encode."""
    if tokens.size and int(tokens.max()) >= len(lengths):
        raise ValueError(f"token id {int(tokens.max())} is outside the tokenizer's {len(lengths)} ids: "
                         "the tokens were made with another tokenizer")
    return int(lengths[tokens].sum())
