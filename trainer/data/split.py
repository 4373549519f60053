"""Deterministic train/validation split by document.

A document's side is decided by a stable hash of its id (file name relative to the input root,
plus line number for jsonl), so adding or removing other documents never moves it, and the
split is the same on every machine (Python's hash() is randomized per process).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def doc_unit(doc_id: str) -> float:
    """Map a document id to a number uniform in [0, 1)."""
    digest = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class ValSplit:
    """is_val(doc_id) is True for documents whose hash falls below val_fraction.

    Needs one pass over all ids up front so it can guarantee a non-empty val split (the
    lowest-hash document, when >= 2 documents and none fell below) and a non-empty train split
    (the highest-hash document stays in train when every document fell below).
    """

    def __init__(self, doc_ids: Iterable[str], val_fraction: float):
        self.val_fraction = val_fraction
        self.force_val = self.force_train = None
        n = n_below = 0
        lowest = highest = None
        for doc_id in doc_ids:
            n += 1
            if val_fraction > 0:
                key = (doc_unit(doc_id), doc_id)
                n_below += key[0] < val_fraction
                lowest = key if lowest is None or key < lowest else lowest
                highest = key if highest is None or key > highest else highest
        self.n_documents = n
        if val_fraction > 0 and n >= 2 and n_below == 0:
            self.force_val = lowest[1]
        if val_fraction > 0 and n >= 1 and n_below == n:
            self.force_train = highest[1]

    def is_val(self, doc_id: str) -> bool:
        if self.val_fraction <= 0 or doc_id == self.force_train:
            return False
        return doc_id == self.force_val or doc_unit(doc_id) < self.val_fraction
