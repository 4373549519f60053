"""Data mixtures: several sources, each tokenized and cached on its own, drawn by weight.

`data.path = "web/*.parquet,code/,books.jsonl.zst"` with `data.weights = "0.6,0.3,0.1"` trains on
blocks drawn 60/30/10 from the three, whatever their sizes: a small source is repeated (a new
shuffle each time round), a large one is seen in part. Sources are cached separately, so changing
one source or the weights re-tokenizes nothing else.

Which source the k-th block of a run comes from is decided greedily, always the source furthest
below its share (w_s * k minus the blocks it has given), as Megatron-LM's blended datasets do
(megatron/core/datasets/helpers.cpp, build_blending_indices): the proportions hold to within a
block at every step, with no randomness to drift. Within a source, blocks come in a per-epoch
permutation seeded by (train.seed, source, epoch). The whole state is a few integers per source.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from trainer.config import parse_data_weights
from trainer.errors import ConfigError

from .errors import DataError
from .shards import TokenShards
from .sources import Corpus

log = logging.getLogger("trainer.data")


def parse_weights(weights, entries: list[str]) -> list[float]:
    """data.weights ("0.7,0.3" or a list of numbers) checked against data.path's entries; normalised to sum 1."""
    try:
        return parse_data_weights(weights, entries)
    except ConfigError as e:
        raise DataError(str(e)) from None


class TokenMixture:
    """The train streams of a mixture's sources, with their names (as written in data.path) and weights."""

    def __init__(self, names: list[str], weights: list[float], streams: list[TokenShards]):
        if not (len(names) == len(weights) == len(streams)) or not names:
            raise DataError("a mixture needs one name and one weight per stream")
        total = float(sum(weights))
        self.names, self.weights, self.streams = list(names), [w / total for w in weights], list(streams)
        self.eos_id = getattr(streams[0], "eos_id", None)
        self.dtype = streams[0].dtype

    def __len__(self) -> int:
        return sum(len(s) for s in self.streams)

    def __repr__(self) -> str:
        parts = ", ".join(f"{n!r}: {w:.3g}" for n, w in zip(self.names, self.weights))
        return f"TokenMixture({parts})"


class MixtureSampler:
    """Draws (source, block) pairs: sources by weight, each source's blocks in a seeded permutation per epoch."""

    def __init__(self, blocks: list[int], weights: list[float], seed: int, shuffle: bool = True):
        self.blocks, self.weights = [int(b) for b in blocks], np.asarray(weights, dtype=np.float64)
        self.seed, self.shuffle = seed, shuffle
        k = len(blocks)
        self.epoch, self.position = [0] * k, [0] * k
        self.drawn = [0] * k  # blocks drawn from each source over the run
        self.mix_drawn = [0] * k  # the same, since the weights last changed: what the greedy choice balances
        self._perms: dict[int, tuple[int, np.ndarray]] = {}

    def _permutation(self, s: int) -> np.ndarray:
        cached = self._perms.get(s)
        if cached is None or cached[0] != self.epoch[s]:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, s + 1, self.epoch[s]])
                perm = rng.permutation(self.blocks[s])
            else:
                perm = np.arange(self.blocks[s])
            self._perms[s] = cached = (self.epoch[s], perm)
        return cached[1]

    def draw(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The next n draws: (source index, block index within that source) arrays."""
        sources, blocks = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
        mix = np.asarray(self.mix_drawn, dtype=np.float64)
        total = mix.sum()
        for i in range(n):
            s = int(np.argmax(self.weights * (total + 1) - mix))  # furthest below its share; ties: first
            sources[i], blocks[i] = s, self._permutation(s)[self.position[s]]
            mix[s] += 1
            total += 1
            self.drawn[s] += 1
            self.position[s] += 1
            if self.position[s] == self.blocks[s]:  # a source runs out: its next epoch, reshuffled
                self.epoch[s] += 1
                self.position[s] = 0
        self.mix_drawn = [int(m) for m in mix]
        return sources, blocks


def union_corpus(spec: str, corpora: list[Corpus], text_field: str) -> Corpus:
    """All the sources' files as one corpus, as resolve_corpus(spec) would give: what a BPE tokenizer trains on."""
    found, skipped = {}, {}
    for corpus in corpora:
        for s in corpus.sources:
            found.setdefault(os.path.realpath(s.path), s)
        for s in corpus.skipped:
            skipped.setdefault(os.path.realpath(s.path), s)

    def order(s):
        return (s.name, s.digest, s.path)

    sources, binary = sorted(found.values(), key=order), sorted(skipped.values(), key=order)
    return Corpus(spec, tuple(sources), text_field, tuple(binary))
