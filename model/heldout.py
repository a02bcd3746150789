"""Which of a source's kept documents are held out: chosen by a hash of their text, so the same ones every time.

Of each source's documents, those whose text's sha256 is lowest: ``fraction`` of them and at
least ``min_documents`` (or a quarter of a source too small for that, so training keeps most
documents), skipping any that would take the held-out text past HELDOUT_MAX_SHARE of the
source's (a small source of uneven documents keeps its big ones for training).
"""

from __future__ import annotations

import hashlib
from array import array

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


class HeldOutDraw:
    """One source's documents as keys (document_key) and sizes: which are held out."""

    def __init__(self) -> None:
        self.keys, self.chars = array("Q"), array("Q")  # 16 bytes a document: millions fit in memory

    def add(self, text: str) -> int:
        key = document_key(text)
        self.add_key(key, len(text))
        return key

    def add_key(self, key: int, chars: int) -> None:
        self.keys.append(key)
        self.chars.append(chars)

    def heldout(self, fraction: float, min_documents: int) -> frozenset[int]:
        """The held-out documents' keys: the lowest ones, as many as heldout_count says, within HELDOUT_MAX_SHARE.

        Identical texts share a key, so an undeduplicated copy of a held-out document is held out too.
        """
        count = heldout_count(len(self.keys), fraction, min_documents)
        keys, chars = np.frombuffer(self.keys, dtype=np.uint64), np.frombuffer(self.chars, dtype=np.uint64)
        budget = max(fraction, HELDOUT_MAX_SHARE) * int(chars.sum())
        chosen: set[int] = set()
        used = 0
        for index in np.argsort(keys, kind="stable"):
            if len(chosen) == count:
                break
            if used + int(chars[index]) <= budget:  # too big a document stays in training
                chosen.add(int(keys[index]))
                used += int(chars[index])
        return frozenset(chosen)
