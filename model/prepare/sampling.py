"""What the one-task tokenizer stage reads of the corpus, without holding it or reading all its text.

The held-out draw (model/heldout.py) merges the tasks' key files, each sorted by key, and
reads them only as far as the last key it chooses. The tokenizer's weighted sample walks the
spools' indexes (each line's key and byte offset): which lines it takes is worked out on the
indexes in numpy, and only the lines taken are read. Both give exactly what reading every
document in corpus order would: the draws come from the same seeded generator, in bulk.
"""

from __future__ import annotations

import heapq
import json
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from model.heldout import held_out
from model.prepare.work import spool_index

HELD_OUT_EVERY = 10  # every 10th kept document is left out of tokenizer training to measure fertility
_BLOCK = 65_536  # keys read from each task's file at a time while merging
_SEEK_BELOW = 0.25  # a spool more sparsely sampled than this is read line by line at the sampled offsets


def lowest_first(key_files: list[Path]) -> Iterator[tuple[int, int]]:
    """Every (key, chars) of the tasks' key files (each sorted by key), in ascending key order."""
    def pairs(path: Path) -> Iterator[tuple[int, int]]:
        keys = np.load(path, mmap_mode="r")
        for start in range(0, len(keys), _BLOCK):
            block = np.asarray(keys[start : start + _BLOCK])
            yield from zip(block[:, 0].tolist(), block[:, 1].tolist())

    return heapq.merge(*(pairs(path) for path in key_files))


def weighted_sample(spools: list[Path], rate: float, heldout: np.ndarray, seed: str) -> Iterator[str]:
    """A source's documents, each ``int(rate)`` times and once more with probability ``rate - int(rate)``.

    ``spools`` in corpus order. Left out: every HELD_OUT_EVERY-th document (fertility is measured
    on them) and the held-out ones (``heldout``, ascending keys). One draw from
    ``random.Random(seed)`` per document considered, in corpus order.
    """
    draws = _numpy_twin(random.Random(seed))
    whole, fraction = int(rate), rate - int(rate)
    position = 0  # of the spool's first document in the source
    for spool in spools:
        index = np.load(spool_index(spool))
        lines = len(index)
        considered = (np.arange(position, position + lines) % HELD_OUT_EVERY != HELD_OUT_EVERY - 1)
        considered &= ~held_out(heldout, index[:, 0])
        copies = np.zeros(lines, dtype=np.int64)
        copies[considered] = whole + (draws.random_sample(int(considered.sum())) < fraction)
        position += lines
        for text, count in _read_lines(spool, index[:, 1], copies):
            for _ in range(count):
                yield text


def _read_lines(spool: Path, offsets: np.ndarray, copies: np.ndarray) -> Iterator[tuple[str, int]]:
    """The text of each line with copies, and its copies."""
    taken = np.flatnonzero(copies)
    with open(spool, "rb") as lines:
        if len(taken) < _SEEK_BELOW * len(copies):
            for line in taken.tolist():
                lines.seek(int(offsets[line]))
                yield json.loads(lines.readline())["text"], int(copies[line])
        else:
            for line, count in zip(lines, copies.tolist()):
                if count:
                    yield json.loads(line)["text"], count


def _numpy_twin(rng: random.Random) -> np.random.RandomState:
    """A numpy generator in ``rng``'s state: its random_sample(n) gives the n floats rng.random() would.

    Both are the Mersenne Twister, and both make a float from two 32-bit outputs the same way.
    """
    _, internal, _ = rng.getstate()
    twin = np.random.RandomState()
    twin.set_state(("MT19937", np.asarray(internal[:-1], dtype=np.uint32), internal[-1]))
    return twin
