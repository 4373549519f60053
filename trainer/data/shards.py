"""Token shards: a split's token stream stored as files of bounded size, memory-mapped for training.

A shard holds raw little-endian uint16/uint32 tokens (numpy's native layout on every platform we
run on) and nothing else; meta.json lists the shards of each split in order with their counts.
Shard boundaries fall anywhere, even inside a document: TokenShards reads the shards as one
stream, and a block that crosses a boundary is stitched from both sides.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np

# About 1 GiB per shard: few enough files for any corpus, small enough to copy or inspect one.
SHARD_BYTES = 1 << 30
COPY_BYTES = 64 << 20


class TokenShards:
    """Consecutive memory-mapped shard files that read like one read-only 1-D array.

    Slicing a contiguous range returns a numpy array (a view of one shard, or a copy when the range
    crosses shards); np.asarray(stream) concatenates everything (for tests and small data).
    `eos_id` travels with the stream, so BlockLoader(document_ids=True) needs no separate argument.
    """

    def __init__(self, files: list[str], counts: list[int], dtype, eos_id: int | None = None):
        self.dtype = np.dtype(dtype)
        self.eos_id = eos_id
        self.files = [f for f, n in zip(files, counts) if n > 0]
        counts = [int(n) for n in counts if n > 0]
        # np.memmap cannot map an empty file, so empty shards are never listed.
        self.shards = [np.memmap(f, dtype=self.dtype, mode="r", shape=(n,)) for f, n in zip(self.files, counts)]
        self.offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    ndim = 1

    @property
    def nbytes(self) -> int:
        return len(self) * self.dtype.itemsize

    def __getitem__(self, key):
        n = len(self)
        if isinstance(key, (int, np.integer)):
            i = int(key) + n if key < 0 else int(key)
            if not 0 <= i < n:
                raise IndexError(f"index {key} out of range for {n} tokens")
            shard = int(np.searchsorted(self.offsets, i, side="right")) - 1
            return self.shards[shard][i - self.offsets[shard]]
        if not isinstance(key, slice):
            raise TypeError(f"TokenShards takes an integer or a slice, not {type(key).__name__}")
        start, stop, step = key.indices(n)
        if step != 1:
            return self[start:stop] if start < stop else np.zeros(0, self.dtype)[::step]
        if start >= stop:
            return np.zeros(0, self.dtype)
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        last = int(np.searchsorted(self.offsets, stop, side="left")) - 1
        if first == last:
            base = self.offsets[first]
            return self.shards[first][start - base : stop - base]
        parts = []
        for i in range(first, last + 1):
            base = self.offsets[i]
            parts.append(self.shards[i][max(start - base, 0) : min(stop - base, len(self.shards[i]))])
        return np.concatenate(parts)

    def __array__(self, dtype=None, copy=None):
        whole = np.concatenate(self.shards) if self.shards else np.zeros(0, self.dtype)
        return whole if dtype is None else whole.astype(dtype)

    def tolist(self) -> list[int]:
        return np.asarray(self).tolist()

    def __repr__(self) -> str:
        return f"TokenShards({len(self):,} {self.dtype.name} tokens in {len(self.shards)} shard(s))"


def write_shards(folder: str, split: str, parts: Iterable[str], dtype, shard_bytes: int | None = None) -> list[dict]:
    """Concatenate the token files `parts`, in order, into folder/<split>-00000.bin, ... of at most
    shard_bytes each; returns [{"file", "tokens"}] in order. Streams: memory stays at one copy buffer."""
    itemsize = np.dtype(dtype).itemsize
    limit = max(itemsize, (shard_bytes or SHARD_BYTES) // itemsize * itemsize)
    shards: list[dict] = []
    out, room = None, 0
    buffer = bytearray(min(COPY_BYTES, limit))
    try:
        for part in parts:
            with open(part, "rb") as f:
                while True:
                    if out is None or room == 0:
                        if out is not None:
                            out.close()
                        name = f"{split}-{len(shards):05d}.bin"
                        out = open(os.path.join(folder, name), "wb")
                        shards.append({"file": name, "tokens": 0})
                        room = limit
                    view = memoryview(buffer)[: min(len(buffer), room)]
                    n = f.readinto(view)
                    if not n:
                        break
                    out.write(view[:n])
                    room -= n
                    shards[-1]["tokens"] += n // itemsize
    finally:
        if out is not None:
            out.close()
    if shards and shards[-1]["tokens"] == 0:  # a shard opened for input that turned out to be empty
        os.remove(os.path.join(folder, shards.pop()["file"]))
    return shards
