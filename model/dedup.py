"""Duplicate removal across a whole corpus: exact (hash of the text) and near (MinHash LSH).

Near-duplicates are documents whose sets of word n-grams ("shingles") have a
Jaccard similarity above the threshold, estimated by ``datasketch``'s MinHash and
found in sub-linear time by its LSH index. The first document seen is kept. Both
indexes grow with the number of kept documents (8 bytes of hash plus about 3 KB of
LSH buckets each); everything else in preparation streams.
"""

from __future__ import annotations

import hashlib

from datasketch import MinHash, MinHashLSH

from model.corpus_config import DedupSettings


class Deduplicator:
    def __init__(self, settings: DedupSettings) -> None:
        self.settings = settings
        self._exact: set[bytes] = set()
        self._lsh = (
            MinHashLSH(threshold=settings.near_threshold, num_perm=settings.minhash_permutations)
            if settings.near_threshold > 0 else None
        )
        # Permutations drawn once and shared: building them per document would cost more than hashing it.
        self._template = MinHash(num_perm=settings.minhash_permutations, seed=1)
        self._kept = 0

    def reason(self, text: str) -> str | None:
        """"exact_duplicate", "near_duplicate", or None (and the text is remembered as kept)."""
        digest = hashlib.blake2b(text.strip().encode("utf-8"), digest_size=8).digest()
        if self.settings.exact and digest in self._exact:
            return "exact_duplicate"
        if self._lsh is not None:
            signature = self._signature(text)
            if self._lsh.query(signature):
                return "near_duplicate"
            self._lsh.insert(self._kept, signature, check_duplication=False)
        if self.settings.exact:
            self._exact.add(digest)
        self._kept += 1
        return None

    def _signature(self, text: str) -> MinHash:
        words = text.lower().split()
        n = self.settings.shingle_words
        shingles = {" ".join(words[i : i + n]).encode("utf-8") for i in range(max(1, len(words) - n + 1))}
        signature = MinHash(
            num_perm=self.settings.minhash_permutations, permutations=self._template.permutations,
            scheme=self._template.scheme,
        )
        signature.update_batch(list(shingles))
        return signature
