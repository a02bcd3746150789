"""Byte-level BPE tokenizers, trained locally and saved in Hugging Face format.

Byte-level means every string (accents, emoji, code) encodes and decodes exactly,
with no unknown token: a French corpus never loses its "é". The saved directory is
what ``transformers.AutoTokenizer.from_pretrained`` reads, offline.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# Order fixes the ids (0..3); model.presets relies on them. "</s>" ends each document.
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(len(SPECIAL_TOKENS))

_BYTE_ALPHABET = pre_tokenizers.ByteLevel.alphabet()
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(_BYTE_ALPHABET)
PIECE_CHARS = 100_000  # longer texts are trained on and encoded piece by piece (see pretoken_pieces)


def pretoken_pieces(text: str, max_chars: int = PIECE_CHARS) -> Iterator[str]:
    """``text`` in consecutive pieces of at most ``max_chars``, cut where the pre-tokenizer splits anyway.

    Cuts fall after a lone newline between two visible characters, so the pieces pre-tokenize into
    the whole text's words: a trainer counts the same words and an encoder gives the same ids,
    without holding a long text's alignments at once (tens of MB for one long source file).
    """
    while len(text) > max_chars:
        cut = text.rfind("\n", 0, max_chars - 1)
        while cut > 0 and (text[cut - 1].isspace() or text[cut + 1].isspace()):
            cut = text.rfind("\n", 0, cut)
        cut = cut + 1 if cut > 0 else max_chars
        yield text[:cut]
        text = text[cut:]
    yield text


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: Path
) -> transformers.PreTrainedTokenizerFast:
    """Train a byte-level BPE of at most ``vocab_size`` tokens on ``texts`` and save it.

    ``texts`` is consumed once, as a stream, so a corpus need not fit in memory.
    On a small corpus the vocabulary may stay below ``vocab_size`` (BPE stops when
    no pair is left to merge); ``len(tokenizer)`` gives the real size.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size {vocab_size} is too small: a byte-level tokenizer needs at least "
            f"{MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    tokenizer = Tokenizer(models.BPE())
    # No prefix space: decoding must give back the exact input string.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=_BYTE_ALPHABET,
        show_progress=False,
    )
    tokenizer.train_from_iterator((piece for text in texts for piece in pretoken_pieces(text)), trainer)

    wrapped = _wrap(tokenizer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(out_dir)
    return wrapped


def load_tokenizer(path: Path) -> transformers.PreTrainedTokenizerFast:
    """Load a tokenizer directory written by ``train_tokenizer`` (or any HF fast tokenizer)."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"no tokenizer.json in {path}: point to the 'tokenizer' directory written by "
            "`essaim data prepare`, or run it to train one"
        )
    return transformers.PreTrainedTokenizerFast.from_pretrained(path)


def tokenizer_sha256(path: Path) -> str:
    """The sha256 of ``tokenizer.json``: the identity a run's genesis records."""
    tokenizer_json = Path(path) / "tokenizer.json"
    try:
        return hashlib.sha256(tokenizer_json.read_bytes()).hexdigest()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no tokenizer.json in {path}: cannot hash a tokenizer that is not there"
        ) from None


def tokenizer_from_json(tokenizer_json: bytes) -> transformers.PreTrainedTokenizerFast:
    """Rebuild a tokenizer from its tokenizer.json bytes, as a coordinator sends them to workers."""
    return _wrap(Tokenizer.from_str(tokenizer_json.decode("utf-8")))


def _wrap(tokenizer: Tokenizer) -> transformers.PreTrainedTokenizerFast:
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        # The default clean-up would turn "va ?" into "va?" on decode.
        clean_up_tokenization_spaces=False,
    )
