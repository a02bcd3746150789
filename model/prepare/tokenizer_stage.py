"""Stage 8 (one task): draw the held-out split, train the tokenizer on the weighted mixture, measure fertility.

The tokenizer learns from a sample of the deduplicated spools drawn by source weight, and an
English-only one beside it shows what the mixture gains in other languages. Held-out
documents are chosen here from every task's keys (model/heldout.py), and left out of the
tokenizer's training text, so nothing the pipeline fits has seen them. The stage reads the
keys only up to the last one held out, and of the spools only the lines its sample takes
(model/prepare/sampling.py): however big the corpus, it trains on its sample.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from datatrove.pipeline.base import PipelineStep

from model.corpus_config import Corpus, Source
from model.heldout import choose_heldout
from model.prepare.dedup import read_tallies
from model.prepare.filtering import write_json_atomically
from model.prepare.sampling import HELD_OUT_EVERY, lowest_first, weighted_sample
from model.prepare.work import WorkDir
from model.tokenizer import pretoken_pieces, tokenizer_sha256, train_tokenizer

# Documents encode in batches (parallel in `tokenizers`) of at most this many documents and
# characters: an encoding holds ~100 bytes per token, so the character bound keeps memory flat.
_ENCODE_BATCH_DOCUMENTS = 256
_ENCODE_BATCH_CHARS = 250_000


def spooled(paths: list[Path]) -> Iterator[tuple[str, str, int]]:
    """Spooled documents as (text, date, key), in the order of ``paths``."""
    for path in paths:
        with open(path, encoding="utf-8") as lines:
            for line in lines:
                record = json.loads(line)
                yield record["text"], record["date"], record["key"]


def batches(items, text=lambda item: item):  # type: ignore[no-untyped-def]
    """Consecutive lists of items, each within the encode batch bounds."""
    batch, chars = [], 0
    for item in items:
        batch.append(item)
        chars += len(text(item))
        if len(batch) == _ENCODE_BATCH_DOCUMENTS or chars >= _ENCODE_BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


class TrainTokenizer(PipelineStep):
    name = "tokenizer"
    type = "essaim"

    def __init__(self, corpus: Corpus, work: WorkDir) -> None:
        super().__init__()
        self.corpus, self.work = corpus, work

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> None:  # type: ignore[no-untyped-def]
        settings, work = self.corpus.settings, self.work
        tallies = read_tallies(work, "deduplicated")
        chars = {name: tally["chars"] for name, tally in tallies.items()}
        empty = {"documents": 0, "chars": 0}
        heldout = {source.name: self._draw(source.name, tallies.get(source.name, empty)) for source in self.corpus.sources}
        tokenizer = train_tokenizer(self._weighted_sample(self.corpus.sources, chars, settings.tokenizer_chars, heldout),
                                    settings.vocab_size, work.output / "tokenizer")
        english = [s for s in self.corpus.sources if s.language == "en"]
        english_tokenizer = None
        if english:
            english_tokenizer = train_tokenizer(
                self._weighted_sample(english, chars, settings.tokenizer_chars, heldout), settings.vocab_size,
                work.root / "english-tokenizer",
            )
        figures = {"tokenizer": {"vocab_size": len(tokenizer), "sha256": tokenizer_sha256(work.output / "tokenizer")},
                   "fertility": self._fertility(tokenizer, english_tokenizer)}
        write_json_atomically(work.tokenizer_figures, figures)

    def _draw(self, source: str, tally: dict[str, int]) -> np.ndarray:
        """The source's held-out keys (ascending), drawn from every task's, saved for the encode tasks."""
        settings = self.corpus.settings
        key_files = sorted(self.work.heldout_keys(source, 0).parent.glob("*.npy"))
        chosen = choose_heldout(lowest_first(key_files), tally["documents"], tally["chars"],
                                settings.heldout_fraction, settings.heldout_min_documents)
        path = self.work.heldout_chosen(source)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, chosen)
        return chosen

    def _weighted_sample(self, sources: list[Source], chars: dict[str, int], budget_chars: int,
                         heldout: dict[str, np.ndarray]) -> Iterator[str]:
        """About ``budget_chars`` of training text, each source contributing in proportion to its weight.

        A source with more weight than text is repeated (whole documents, so BPE counts scale),
        one with less is sampled. Held-out documents are skipped: fertility is measured on every
        tenth one, and models are evaluated on the held-out split.
        """
        weighted = [s for s in sources if s.weight > 0 and chars.get(s.name)]
        total_weight = sum(s.weight for s in weighted)
        budget = min(budget_chars, sum(chars[s.name] for s in weighted))
        for source in weighted:
            rate = budget * source.weight / total_weight / chars[source.name]
            yield from weighted_sample(self.work.spools(source.name), rate, heldout[source.name],
                                       seed=f"tokenizer-sample-{source.name}")

    def _fertility(self, tokenizer, english_tokenizer) -> dict[str, dict[str, float]]:  # type: ignore[no-untyped-def]
        """Tokens per word on each language's held-out documents, for both tokenizers."""
        figures: dict[str, dict[str, float]] = {}
        sources = self.corpus.sources
        for language in sorted({s.language for s in sources}):
            chosen = [s for s in sources if s.language == language]
            texts = self._text_sample(chosen, held_out_only=True)
            held_out = bool(texts)
            if not held_out:  # too few documents to hold any out: measure on what there is
                texts = self._text_sample(chosen, held_out_only=False)
            words = sum(len(t.split()) for t in texts)
            if not words:
                continue
            entry: dict[str, float] = {"documents": len(texts), "words": words, "held_out": held_out,
                                       "tokens_per_word": _count_tokens(tokenizer, texts) / words}
            if english_tokenizer is not None:
                entry["english_only_tokens_per_word"] = _count_tokens(english_tokenizer, texts) / words
            figures[language] = entry
        return figures

    def _text_sample(self, sources: list[Source], held_out_only: bool) -> list[str]:
        budget_chars = self.corpus.settings.fertility_chars
        texts: list[str] = []
        used = 0
        for source in sources:
            for index, (text, _, _) in enumerate(spooled(self.work.spools(source.name))):
                if held_out_only and index % HELD_OUT_EVERY != HELD_OUT_EVERY - 1:
                    continue
                texts.append(text[: budget_chars - used])
                used += len(texts[-1])
                if used >= budget_chars:
                    return texts
        return texts


def _count_tokens(tokenizer, texts: list[str]) -> int:  # type: ignore[no-untyped-def]
    encoder = tokenizer.backend_tokenizer
    cut = (piece for text in texts for piece in pretoken_pieces(text))
    return sum(len(e.ids) for batch in batches(cut) for e in encoder.encode_batch_fast(batch, add_special_tokens=False))
