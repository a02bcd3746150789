"""Which of a source's kept documents are held out: chosen by a hash of their text, so the same ones every time.

Of each source's documents, those whose text's sha256 is lowest: ``fraction`` of them and at
least ``min_documents`` (or a quarter of a source too small for that, so training keeps most
documents), skipping any that would take the held-out text past HELDOUT_MAX_SHARE of the
source's (a small source of uneven documents keeps its big ones for training).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable

import numpy as np

# However many documents the counts ask for, a source's held-out text stays within this share of it.
HELDOUT_MAX_SHARE = 0.25


def heldout_count(documents: int, fraction: float, min_documents: int) -> int:
    """How many of a source's kept documents are held out (fewer if they hold too much of its text)."""
    if fraction == 0 or documents == 0:
        return 0
    return max(int(fraction * documents), min(min_documents, documents // 4))


def document_key(text: str) -> int:
    """The first 8 bytes of the text's sha256: what the draw orders documents by."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def choose_heldout(lowest_first: Iterable[tuple[int, int]], documents: int, chars: int, fraction: float,
                   min_documents: int) -> np.ndarray:
    """The held-out keys, ascending, from a source's (key, chars) pairs given in ascending key order.

    The lowest keys, as many as heldout_count says, within HELDOUT_MAX_SHARE of the source's
    ``chars``. Only the pairs up to the last one chosen are read, so a preparation can stream
    them from the tasks' sorted files. Identical texts share a key, so an undeduplicated copy of
    a held-out document is held out too.
    """
    count = heldout_count(documents, fraction, min_documents)
    budget = max(fraction, HELDOUT_MAX_SHARE) * chars
    chosen = array("Q")  # 8 bytes a key: a source of a billion documents holds out 10 million at 1 %
    used = 0
    for key, size in lowest_first:
        if len(chosen) == count:
            break
        if used + size <= budget:  # too big a document stays in training
            if not chosen or chosen[-1] != key:
                chosen.append(key)
            used += size
    return np.frombuffer(chosen, dtype=np.uint64).copy()


def held_out(chosen: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Which of ``keys`` are among the ascending ``chosen`` ones (a bool per key)."""
    if not len(chosen):
        return np.zeros(len(keys), dtype=bool)
    at = np.minimum(np.searchsorted(chosen, keys), len(chosen) - 1)
    return chosen[at] == keys
