"""Cut a flat token stream into training blocks and turn blocks into model inputs.

Block i is tokens[i*seq_len : i*seq_len + seq_len + 1]: seq_len + 1 tokens, so consecutive
blocks share one token and every token except the very first is a label exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .errors import DataError


def num_blocks(n_tokens: int, seq_len: int) -> int:
    return max(0, (n_tokens - 1) // seq_len)


def check_blocks(n_tokens: int, seq_len: int, split: str = "train", source: str | None = None) -> int:
    """Number of blocks, or a DataError explaining why there are none (`source`: which mixture source)."""
    if seq_len < 1:
        raise DataError(f"train.seq_len must be >= 1, got {seq_len}")
    n = num_blocks(n_tokens, seq_len)
    if n < 1:
        of = f" of {source!r}" if source is not None else ""
        raise DataError(
            f"the {split} split{of} has {n_tokens} tokens, too few for one block of seq_len={seq_len} "
            f"(needs seq_len + 1 = {seq_len + 1}); use a smaller train.seq_len, more data"
            + (", or a larger data.val_fraction" if split == "val" else "")
        )
    return n


def document_positions(input_ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(position_ids, document_ids) for (B, T) input_ids.

    A document starts at column 0 and right after every EOS (the EOS belongs to the document it
    ends). position_ids count from 0 at each start; document_ids count starts within the row.
    """
    B, T = input_ids.shape
    starts = torch.zeros(B, T, dtype=torch.bool, device=input_ids.device)
    starts[:, 1:] = input_ids[:, :-1] == eos_id
    document_ids = torch.cumsum(starts, dim=1)
    col = torch.arange(T, device=input_ids.device).expand(B, T)
    # Column of the latest start at or before each token (column 0 counts as a start).
    last_start = torch.cummax(torch.where(starts, col, torch.zeros_like(col)), dim=1).values
    return col - last_start, document_ids


def make_batch(
    tokens: np.ndarray,
    block_indices: Sequence[int],
    seq_len: int,
    document_ids: bool = False,
    eos_id: int | None = None,
) -> dict[str, torch.Tensor]:
    """Gather blocks into a dict of int64 (B, seq_len) tensors: input_ids, labels[, position_ids, document_ids]."""
    rows = np.stack([tokens[i * seq_len : i * seq_len + seq_len + 1] for i in block_indices])
    return rows_to_batch(rows, document_ids, eos_id)


def rows_to_batch(rows: np.ndarray, document_ids: bool = False, eos_id: int | None = None) -> dict[str, torch.Tensor]:
    """(B, seq_len + 1) token rows -> the model's inputs (see make_batch)."""
    rows = torch.from_numpy(rows.astype(np.int64))
    # Contiguous copies: models call .view() on these, and labels must not alias inputs.
    batch = {"input_ids": rows[:, :-1].contiguous(), "labels": rows[:, 1:].contiguous()}
    if document_ids:
        if eos_id is None:
            raise DataError("document_ids=True needs eos_id (the tokenizer's eos_id)")
        batch["position_ids"], batch["document_ids"] = document_positions(batch["input_ids"], eos_id)
    return batch
