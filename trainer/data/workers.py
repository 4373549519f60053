"""Tokenize pieces of a corpus in worker processes; each piece's tokens go to its own files.

Each piece writes <folder>/piece-<index>.train.bin and .val.bin (every document's tokens followed
by EOS, in order) under temporary names, renames them, and writes piece-<index>.json last: a
piece is complete exactly when its .json exists, so a run killed at any moment leaves only
complete pieces or files nobody reads, and the next run tokenizes just the rest.

The val split is decided per document from a hash of its id (split.doc_unit). Its two guarantees
(a val split whenever there are two documents, a train split whenever there is one) need the whole
corpus, so each piece reports its lowest and highest hash; prepare.py redoes the one piece that
holds a document the guarantees move, with force_val / force_train set.

Processes are forked where that is the platform's way (Linux), as torch's DataLoader and
datasets.map do: a worker starts in milliseconds and imports nothing. Each worker tokenizes on one
thread (TOKENIZERS_PARALLELISM=false), so N workers use N cores.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np

from .errors import DataError
from .pieces import Piece
from .readers import ReadStats, read_span
from .sources import Source
from .split import doc_unit
from .tokenizer import Tokenizer

# Documents per encode_batch call, and a byte cap so one batch of huge documents stays small in memory.
BATCH_DOCS = 1024
BATCH_BYTES = 8 << 20


@dataclass
class TokenizeJob:
    sources: tuple[Source, ...]
    text_field: str
    tokenizer: Tokenizer
    dtype: str
    val_fraction: float
    folder: str  # where piece files go


def piece_file(folder: str, index: int, what: str) -> str:
    """what: "train" / "val" (token files) or "json" (the record that says the piece is complete)."""
    suffix = "json" if what == "json" else f"{what}.bin"
    return os.path.join(folder, f"piece-{index:06d}.{suffix}")


def resolve_workers(num_workers: int) -> int:
    if not isinstance(num_workers, int) or num_workers < 0:
        raise DataError(f"data.num_workers must be a non-negative integer (0: one per CPU), got {num_workers!r}")
    if num_workers:
        return num_workers
    try:
        return max(1, len(os.sched_getaffinity(0)))  # the CPUs this process may use, not the machine's
    except AttributeError:
        return max(1, os.cpu_count() or 1)


class _Counters:
    """Bytes and documents done: summed in shared memory by workers (the parent reads it for the
    progress bar), or handed straight to a callback in this process."""

    def __init__(self, shared=None, callback=None):
        self.shared, self.callback = shared, callback

    def add(self, n_bytes: int, n_docs: int) -> None:
        if self.callback is not None:
            self.callback(n_bytes, n_docs)
        if self.shared is not None:
            with self.shared.get_lock():
                self.shared[0] += n_bytes
                self.shared[1] += n_docs


def tokenize_piece(
    job: TokenizeJob,
    piece: Piece,
    force_val: str | None = None,
    force_train: str | None = None,
    counters: _Counters | None = None,
) -> dict:
    """Tokenize one piece into its files; returns (and writes, last) its record."""
    counters = counters or _Counters()
    tok, dtype = job.tokenizer, np.dtype(job.dtype)
    eos = np.array([tok.eos_id], dtype=dtype)
    stats = ReadStats()
    record = {
        "index": piece.index,
        "tokens": {"train": 0, "val": 0},
        "documents": {"train": 0, "val": 0},
        "n_docs": 0,
        "n_below": 0,
        "lowest": None,
        "highest": None,
        "force_val": force_val,
        "force_train": force_train,
    }
    paths = {s: piece_file(job.folder, piece.index, s) for s in ("train", "val")}
    files = {s: open(p + ".tmp", "wb") for s, p in paths.items()}
    reported = 0

    def is_val(doc_id: str, unit: float) -> bool:
        if doc_id == force_train or job.val_fraction <= 0:
            return False
        return doc_id == force_val or unit < job.val_fraction

    def flush(batch: list) -> None:
        arrays = tok.encode_batch_arrays([text for _, text, _ in batch])
        parts = {"train": [], "val": []}
        for (side, _, ends), ids in zip(batch, arrays):
            parts[side].append(ids.astype(dtype, copy=False))
            if ends:
                parts[side].append(eos)
                record["documents"][side] += 1
        for side, p in parts.items():
            if p:
                chunk = np.concatenate(p)
                chunk.tofile(files[side])
                record["tokens"][side] += len(chunk)

    try:
        batch, batch_bytes, batch_docs = [], 0, 0
        for span in piece.spans:
            source = job.sources[span.source]
            for doc_id, text, n_bytes, ends in read_span(source, span, job.text_field, stats):
                unit = doc_unit(doc_id)
                side = "val" if is_val(doc_id, unit) else "train"
                batch.append((side, text, ends))
                batch_bytes += n_bytes
                if ends:
                    batch_docs += 1
                    _note_document(record, doc_id, unit, job.val_fraction)
                if len(batch) >= BATCH_DOCS or batch_bytes >= BATCH_BYTES:
                    flush(batch)
                    counters.add(batch_bytes, batch_docs)
                    reported += batch_bytes
                    batch, batch_bytes, batch_docs = [], 0, 0
        if batch:
            flush(batch)
        counters.add(piece.n_bytes - reported, batch_docs)  # exact in total, whatever the readers reported
    finally:
        for f in files.values():
            f.close()
    for p in paths.values():
        os.replace(p + ".tmp", p)
    record["read"] = stats.as_dict()
    record["bytes"] = piece.n_bytes
    _write_json(piece_file(job.folder, piece.index, "json"), record)
    return record


def _note_document(record: dict, doc_id: str, unit: float, val_fraction: float) -> None:
    record["n_docs"] += 1
    if val_fraction <= 0:
        return
    record["n_below"] += unit < val_fraction
    key = [unit, doc_id]
    if record["lowest"] is None or key < record["lowest"]:
        record["lowest"] = key
    if record["highest"] is None or key > record["highest"]:
        record["highest"] = key


def _write_json(path: str, obj: dict) -> None:
    import json

    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------- running many


_WORKER: dict = {}


def _init_worker(job: TokenizeJob, shared) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["job"], _WORKER["counters"] = job, _Counters(shared)


def _run_in_worker(piece: Piece) -> dict:
    return tokenize_piece(_WORKER["job"], piece, counters=_WORKER["counters"])


def _context():
    # fork: no re-import of torch and the trainer in every worker. Elsewhere (macOS, Windows) fork is
    # unsafe or missing, and spawn pickles the job over.
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


@contextmanager
def _single_threaded_tokenizers():
    """TOKENIZERS_PARALLELISM=false for the duration (workers inherit it; restored after)."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def run_pieces(job: TokenizeJob, pieces: list[Piece], num_workers: int, progress) -> dict[int, dict]:
    """Tokenize `pieces` with up to num_workers processes; records by piece index.

    num_workers=1 tokenizes here, on one thread. More workers than pieces are not started; a single
    piece with several workers allowed runs here too, with the tokenizer's own threads.
    """
    records: dict[int, dict] = {}
    if not pieces:
        return records
    workers = min(num_workers, len(pieces))
    if workers <= 1:
        counters = _Counters(callback=progress.update)
        with _single_threaded_tokenizers() if num_workers == 1 else nullcontext():
            for piece in pieces:
                records[piece.index] = tokenize_piece(job, piece, counters=counters)
        return records

    ctx = _context()
    shared = ctx.Array("q", 2, lock=True)
    seen = [0, 0]

    def report() -> None:
        with shared.get_lock():
            now = (shared[0], shared[1])
        progress.update(now[0] - seen[0], now[1] - seen[1])
        seen[:] = now

    with _single_threaded_tokenizers(), warnings.catch_warnings():
        # Python >= 3.12 warns on fork in a process with threads (torch's, tokenizers'); the workers
        # only read files and tokenize, and never touch what those threads hold.
        warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
        executor = ProcessPoolExecutor(
            max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(job, shared)
        )
        try:
            futures = {executor.submit(_run_in_worker, piece): piece for piece in pieces}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                report()
                for future in done:
                    records[futures[future].index] = future.result()
        except BrokenProcessPool:
            raise DataError(
                f"a tokenizing process died (out of memory?); finished pieces are kept in {job.folder}: rerun with "
                f"a smaller data.num_workers (was {num_workers}) to resume"
            ) from None
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
    return records
