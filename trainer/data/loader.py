"""Deterministic, resumable block sampling for data parallelism and gradient accumulation.

Each optimizer step takes the next G = micro_batch_size * grad_accum_steps * world_size block
indices from a per-epoch permutation. Only G decides which blocks a step sees; how they are
split across ranks and micro-batches does not, so changing the parallel layout at a fixed
global batch leaves the training data identical. The state is just (seed, epoch, position):
resuming never replays data.

A TokenMixture (data.weights) draws each step's G blocks from its sources by weight (see
mixture.py); every rank computes the same G draws and takes its slice, so the same invariants
hold, and the state is (epoch, position, blocks drawn) per source.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np

from trainer.config import check_positive

from .blocks import check_blocks, make_batch, rows_to_batch
from .errors import DataError
from .mixture import MixtureSampler, TokenMixture
from .sft import PackedExamples

STATE_VERSION = 1  # one token stream
MIXTURE_STATE_VERSION = 2  # a TokenMixture: per-source state
log = logging.getLogger("trainer.data")


def _check_rank(world_size: int, rank: int) -> None:
    check_positive("world_size", world_size)
    if not 0 <= rank < world_size:
        raise DataError(f"rank must be in [0, {world_size}), got {rank}")


def _count_blocks(tokens, seq_len: int, split: str) -> int:
    if isinstance(tokens, PackedExamples):  # SFT rows are packed for one seq_len
        if tokens.seq_len != seq_len:
            raise DataError(f"the SFT examples were packed for seq_len {tokens.seq_len}, not {seq_len}")
        return tokens.n_blocks
    return check_blocks(len(tokens), seq_len, split)


def _make_batch(tokens, block_indices, seq_len: int, document_ids: bool, eos_id: int | None) -> dict:
    if isinstance(tokens, PackedExamples):  # always with position_ids and document_ids
        return tokens.batch(block_indices)
    return make_batch(tokens, block_indices, seq_len, document_ids, eos_id)


def _eos_of(tokens, eos_id: int | None, document_ids: bool) -> int | None:
    # prepare_data's memmaps carry .eos_id; plain arrays need it passed.
    eos_id = eos_id if eos_id is not None else getattr(tokens, "eos_id", None)
    if document_ids and eos_id is None:
        raise DataError("document_ids=True needs eos_id (the tokenizer's eos_id)")
    return eos_id


class BlockLoader:
    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        micro_batch_size: int,
        grad_accum_steps: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        document_ids: bool = False,
        eos_id: int | None = None,
    ):
        self.tokens = tokens
        self.seq_len = check_positive("seq_len", seq_len)
        self.micro_batch_size = check_positive("micro_batch_size", micro_batch_size)
        self.grad_accum_steps = check_positive("grad_accum_steps", grad_accum_steps)
        _check_rank(world_size, rank)
        self.world_size, self.rank = int(world_size), int(rank)
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise DataError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed, self.shuffle = int(seed), bool(shuffle)
        eos_id = _eos_of(tokens, eos_id, document_ids)
        self.document_ids, self.eos_id = bool(document_ids), eos_id

        self.mixture = tokens if isinstance(tokens, TokenMixture) else None
        if self.mixture is not None:
            per_source = [
                check_blocks(len(stream), self.seq_len, "train", name)
                for name, stream in zip(self.mixture.names, self.mixture.streams)
            ]
            self._offsets = np.concatenate([[0], np.cumsum(per_source)]).astype(np.int64)
            self._sampler = MixtureSampler(per_source, self.mixture.weights, self.seed, self.shuffle)
            self.blocks_per_epoch = int(self._offsets[-1])
        else:
            self.blocks_per_epoch = _count_blocks(tokens, self.seq_len, "train")
        self.global_batch = self.micro_batch_size * self.grad_accum_steps * self.world_size
        if self.global_batch > self.blocks_per_epoch:
            raise DataError(
                f"global batch of {self.global_batch} blocks (micro_batch_size {self.micro_batch_size} x "
                f"grad_accum_steps {self.grad_accum_steps} x world_size {self.world_size}) is larger than "
                f"the {self.blocks_per_epoch} blocks of seq_len {self.seq_len} in the training data; use a "
                "smaller train.micro_batch_size, train.grad_accum_steps or train.seq_len, or more data"
            )
        # Epochs completed (the epoch the next step draws from) and blocks of it consumed. For a mixture
        # both count blocks drawn from all sources against the sum of the sources' blocks.
        self.epoch = 0
        self.position = 0
        self.steps = 0
        self._perm_epoch = -1
        self._perm = None

    @property
    def steps_per_epoch(self) -> int:
        return self.blocks_per_epoch // self.global_batch

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            if self.shuffle:
                # Seeded by (seed, epoch): any epoch's order is reproducible without replaying earlier ones.
                rng = np.random.default_rng([self.seed, self.epoch])
                self._perm = rng.permutation(self.blocks_per_epoch)
            else:
                self._perm = np.arange(self.blocks_per_epoch)
            self._perm_epoch = self.epoch
        return self._perm

    def _roll_epoch(self) -> None:
        # The tail of a permutation shorter than a global batch is dropped: every step is full size.
        if self.blocks_per_epoch - self.position < self.global_batch:
            self.epoch += 1
            self.position = 0

    def next_global_indices(self) -> np.ndarray:
        """Advance one step and return all G block indices of it (every rank's, in rank order).

        For a mixture an index counts through the sources' blocks one source after the other."""
        if self.mixture is not None:
            sources, blocks = self._sampler.draw(self.global_batch)
            self.steps += 1
            self._mixture_position()
            return self._offsets[sources] + blocks
        self._roll_epoch()
        idx = self._permutation()[self.position : self.position + self.global_batch]
        self.position += self.global_batch
        self.steps += 1
        self._roll_epoch()  # so `epoch` reads as completed epochs right after the last step of one
        return idx

    def next_step(self) -> list[dict]:
        """This rank's grad_accum_steps micro-batches for the next optimizer step."""
        per_rank = self.micro_batch_size * self.grad_accum_steps
        mine = self.next_global_indices()[self.rank * per_rank : (self.rank + 1) * per_rank]
        mbs = self.micro_batch_size
        return [self._batch(mine[i * mbs : (i + 1) * mbs]) for i in range(self.grad_accum_steps)]

    def _batch(self, indices: np.ndarray) -> dict:
        if self.mixture is None:
            return _make_batch(self.tokens, indices, self.seq_len, self.document_ids, self.eos_id)
        sources = np.searchsorted(self._offsets, indices, side="right") - 1
        rows = []
        for s, index in zip(sources, indices):
            start = int(index - self._offsets[s]) * self.seq_len
            rows.append(self.mixture.streams[s][start : start + self.seq_len + 1])
        return rows_to_batch(np.stack(rows), self.document_ids, self.eos_id)

    def _mixture_position(self) -> None:
        total = sum(self._sampler.drawn)
        self.epoch, self.position = divmod(total, self.blocks_per_epoch)

    def tokens_by_source(self) -> dict[str, int]:
        """Tokens drawn from each mixture source so far, all ranks together (each block gives seq_len
        input and seq_len label tokens); {} when the loader reads one stream."""
        if self.mixture is None:
            return {}
        return {name: n * self.seq_len for name, n in zip(self.mixture.names, self._sampler.drawn)}

    def __iter__(self) -> Iterator[list[dict]]:
        while True:
            yield self.next_step()

    def state_dict(self) -> dict:
        if self.mixture is not None:
            return self._mixture_state()
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "epoch": self.epoch,
            "position": self.position,
            "steps": self.steps,
            "blocks_per_epoch": self.blocks_per_epoch,
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the saved loader stopped.

        seed and shuffle come from the state (resuming must not change the order). The global
        batch may differ (e.g. a new world size); the data then continues from the same point.
        """
        version = state.get("version")
        if self.mixture is not None:
            return self._load_mixture_state(state)
        if version == MIXTURE_STATE_VERSION:
            raise DataError(
                f"the checkpoint's data sampler mixed {len(state['sources'])} sources (data.weights) but this run "
                "reads one corpus; resume with the checkpoint's data.path and data.weights"
            )
        if version != STATE_VERSION:
            raise DataError(f"unknown loader state version {version!r} (expected {STATE_VERSION})")
        if state["blocks_per_epoch"] != self.blocks_per_epoch:
            raise DataError(
                f"loader state was saved with {state['blocks_per_epoch']} blocks per epoch but this data "
                f"has {self.blocks_per_epoch} at seq_len {self.seq_len}: different data or seq_len"
            )
        self.seed, self.shuffle = int(state["seed"]), bool(state["shuffle"])
        self.epoch, self.position, self.steps = int(state["epoch"]), int(state["position"]), int(state["steps"])
        self._perm_epoch = -1
        self._roll_epoch()

    def _mixture_state(self) -> dict:
        sampler = self._sampler
        return {
            "version": MIXTURE_STATE_VERSION,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "steps": self.steps,
            "seq_len": self.seq_len,
            "global_batch": self.global_batch,
            "sources": [
                {
                    "name": name,
                    "weight": weight,
                    "blocks_per_epoch": blocks,
                    "epoch": epoch,
                    "position": position,
                    "drawn": drawn,
                    "mix_drawn": mix_drawn,
                }
                for name, weight, blocks, epoch, position, drawn, mix_drawn in zip(
                    self.mixture.names,
                    self.mixture.weights,
                    sampler.blocks,
                    sampler.epoch,
                    sampler.position,
                    sampler.drawn,
                    sampler.mix_drawn,
                )
            ],
            "tokens_by_source": self.tokens_by_source(),
        }

    def _load_mixture_state(self, state: dict) -> None:
        version = state.get("version")
        if version == STATE_VERSION:
            raise DataError(
                f"the checkpoint's data sampler read one corpus but this run mixes {len(self.mixture.names)} sources "
                "(data.weights); resume with the checkpoint's data.path and no data.weights"
            )
        if version != MIXTURE_STATE_VERSION:
            raise DataError(f"unknown loader state version {version!r} (expected {MIXTURE_STATE_VERSION})")
        saved = state["sources"]
        names = [s["name"] for s in saved]
        if names != self.mixture.names:
            raise DataError(
                f"the checkpoint mixed the sources {names} but this run mixes {self.mixture.names}; "
                "resume with the checkpoint's data.path"
            )
        sampler = self._sampler
        for s, blocks in zip(saved, sampler.blocks):
            if s["blocks_per_epoch"] != blocks:
                raise DataError(
                    f"loader state was saved with {s['blocks_per_epoch']} blocks per epoch of {s['name']!r} but this "
                    f"data has {blocks} at seq_len {self.seq_len}: different data or seq_len"
                )
        self.seed, self.shuffle = int(state["seed"]), bool(state["shuffle"])
        sampler.seed, sampler.shuffle = self.seed, self.shuffle
        sampler.epoch = [int(s["epoch"]) for s in saved]
        sampler.position = [int(s["position"]) for s in saved]
        sampler.drawn = [int(s["drawn"]) for s in saved]
        sampler.mix_drawn = [int(s["mix_drawn"]) for s in saved]
        sampler._perms.clear()
        old = [float(s["weight"]) for s in saved]
        if not np.allclose(old, self.mixture.weights, rtol=1e-9, atol=0):
            # New proportions apply from here on; balancing them against the old draws would starve a source.
            log.warning(
                "data.weights changed since the checkpoint (%s -> %s): the new proportions apply from this step",
                ", ".join(f"{w:.3g}" for w in old),
                ", ".join(f"{w:.3g}" for w in self.mixture.weights),
            )
            sampler.mix_drawn = [0] * len(saved)
        self.steps = int(state["steps"])
        self._mixture_position()


def eval_batches(
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
    world_size: int = 1,
    rank: int = 0,
    document_ids: bool = False,
    eos_id: int | None = None,
) -> Iterator[dict]:
    """Validation blocks in order, batch_size per rank per batch, no shuffling.

    Every rank yields the same number of non-empty batches (collectives on the loss must not
    hang). The last batch may be smaller; at most world_size - 1 trailing blocks are skipped.
    """
    check_positive("batch_size", batch_size)
    _check_rank(world_size, rank)
    eos_id = _eos_of(tokens, eos_id, document_ids)
    n = _count_blocks(tokens, check_positive("seq_len", seq_len), "val")
    if n < world_size:
        raise DataError(f"the val split has {n} blocks of seq_len {seq_len}, fewer than world_size {world_size}")
    start, produced = 0, 0
    while max_batches is None or produced < max_batches:
        per_rank = min(batch_size, (n - start) // world_size)
        if per_rank == 0:
            return
        first = start + rank * per_rank
        yield _make_batch(tokens, range(first, first + per_rank), seq_len, document_ids, eos_id)
        start += per_rank * world_size
        produced += 1
