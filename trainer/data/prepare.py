"""prepare_data: corpus -> tokenizer -> token shards per split, cached by content hash.

Cache layout (cache_dir defaults to $TRAINER_CACHE_DIR, else ~/.cache/trainer):
    tokenizers/bpe-<vocab>-<corpus hash>/tokenizer.json       trained BPE tokenizers
    datasets/<key>/train-00000.bin, ..., val-00000.bin, ...   raw uint16/uint32 tokens, <= 1 GiB a shard
    datasets/<key>/meta.json                                   dtype, shards, counts, sources, hygiene
    datasets/<key>/tokenizer/                                  the tokenizer that made them
    datasets/.partial-<key>/                                   pieces of a tokenization not finished yet
The key hashes everything the tokens depend on: the files' names and contents, the text field,
the tokenizer, the validation fraction and the format's own rules (never the worker count: the
tokens are the same for any). An entry is assembled in a `.tmp-*` folder and renamed into place
when complete, so a killed run never leaves an entry that a later run trusts; the pieces it did
finish stay in `.partial-<key>/` and the next run with the same data tokenizes only the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from trainer.files import make_temp_dir

from . import readers
from .cache import cache_write_error, remove_stale, resolve_cache_dir, writable_subdir
from .errors import DataError
from .mixture import TokenMixture, parse_weights, union_corpus
from .pieces import plan_pieces
from .progress import TokenizeProgress, emit, human_bytes
from .shards import TokenShards, write_shards
from .sources import BINARY_RULE, HASH_MEMO_DIR, Corpus, resolve_corpus, split_path
from .tokenizer import ByteTokenizer, Tokenizer, build_tokenizer
from .workers import TokenizeJob, piece_file, resolve_workers, run_pieces, tokenize_piece

FORMAT_VERSION = 2
log = logging.getLogger("trainer.data")


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    train: TokenShards  # a TokenMixture when data.weights mixes several sources
    val: TokenShards | None
    cache_path: str  # the cache entry (for a mixture: the folder holding the entries of its parts)
    n_documents: int
    meta: dict = field(repr=False, default_factory=dict)
    from_cache: bool = False
    parts: list = field(repr=False, default_factory=list)  # a mixture's PreparedData, one per source

    def describe(self) -> str:
        """What the data became, for the run's start line."""
        return f"{len(self.train):,} training tokens"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def cache_key(corpus: Corpus, tokenizer: Tokenizer, val_fraction: float) -> str:
    blob = {
        "format_version": FORMAT_VERSION,
        "corpus": corpus.fingerprint,  # file names + content hashes (+ text_field for jsonl and tables)
        "tokenizer": tokenizer.fingerprint,
        "val_fraction": repr(float(val_fraction)),
        "text_chunk_bytes": readers.TEXT_CHUNK_BYTES,  # cuts long text files: changes their tokens
        "binary_rule": BINARY_RULE,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def prepare_data(
    path: str,
    tokenizer: str | Tokenizer = "bpe",
    vocab_size: int = 4096,
    val_fraction: float = 0.01,
    cache_dir: str | None = None,
    text_field: str = "text",
    weights: str | list[float] | None = None,
    num_workers: int = 0,
) -> PreparedData:
    """Tokenize `path` once (see sources.ACCEPTED for what it may be) and memory-map the result.

    `tokenizer` is "byte", "bpe", a tokenizer.json path, or a Tokenizer instance. `weights` (one per
    comma-separated entry of `path`, e.g. "0.7,0.3") makes `train` a TokenMixture that BlockLoader
    draws from in those proportions; without it the entries are one corpus. `num_workers` processes
    tokenize (0: one per CPU); the tokens do not depend on it.
    """
    t0 = time.time()
    if not 0 <= val_fraction < 1:
        raise DataError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    cache_dir = resolve_cache_dir(cache_dir)
    workers = resolve_workers(num_workers)
    if weights is not None and weights != "":
        return prepare_mixture(path, weights, tokenizer, vocab_size, val_fraction, cache_dir, text_field, workers)
    corpus = resolve_corpus(path, text_field, hash_memo=os.path.join(cache_dir, HASH_MEMO_DIR))
    check_not_empty(corpus)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else build_tokenizer(tokenizer, corpus, vocab_size, cache_dir)
    return prepare_corpus(corpus, tok, val_fraction, cache_dir, workers, t0)


def check_not_empty(corpus: Corpus) -> None:
    if corpus.n_bytes == 0:
        skipped = f" ({len(corpus.skipped)} more look binary and were skipped)" if corpus.skipped else ""
        raise DataError(
            f"data.path {corpus.spec!r} is an empty corpus: its {len(corpus.sources)} file(s) are all empty{skipped}"
        )


def prepare_corpus(
    corpus: Corpus, tok: Tokenizer, val_fraction: float, cache_dir: str, workers: int, t0: float | None = None
) -> PreparedData:
    """The cached token shards of one corpus with one tokenizer, tokenized first if need be."""
    t0 = t0 or time.time()
    key = cache_key(corpus, tok, val_fraction)
    folder = os.path.join(cache_dir, "datasets", key[:32])
    meta = _read_valid_meta(folder, key)  # a hit needs no write access: a shared read-only cache works
    from_cache = meta is not None
    if not from_cache:
        parent = writable_subdir(cache_dir, "datasets")
        try:
            meta, from_cache = _build(folder, parent, key, corpus, tok, val_fraction, workers)
        except OSError as e:
            raise cache_write_error(parent, e) from None

    dtype = np.dtype(meta["dtype"])
    train = _open_split(folder, meta["splits"]["train"], dtype, tok.eos_id)
    val = _open_split(folder, meta["splits"]["val"], dtype, tok.eos_id) if meta["splits"]["val"] else None
    elapsed = time.time() - t0
    n_val = len(val) if val is not None else 0
    hygiene = hygiene_note(meta)
    build = meta.get("build", {})
    speed = ""
    if not from_cache:
        reused = f", {build['pieces_reused']} of {build['pieces']} pieces reused" if build.get("pieces_reused") else ""
        processes = build.get("processes", workers)
        speed = f" ({human_bytes(build['input_bytes'] / max(elapsed, 1e-9))}/s, {processes} process(es){reused})"
    emit(
        logging.WARNING if hygiene else logging.INFO,
        f"{'used cache' if from_cache else 'tokenized'} {corpus.spec!r}: {meta['n_documents']:,} documents, "
        f"{len(train):,} train + {n_val:,} val tokens ({dtype.name}, vocab {tok.vocab_size}) in {elapsed:.1f}s"
        f"{speed}{hygiene}; cache {folder}",
    )
    if val_fraction > 0 and val is None:
        log.warning("data.val_fraction=%s but %r has a single document: no validation split", val_fraction, corpus.spec)
    return PreparedData(tok, train, val, folder, meta["n_documents"], meta, from_cache)


def hygiene_note(meta: dict) -> str:
    """What was odd about the input, for the summary line ("" when nothing was)."""
    h = meta.get("hygiene", {})
    notes = []
    if h.get("binary_files"):
        names = h["binary_files"]
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        notes.append(f"skipped {len(names)} file(s) that look binary ({shown})")
    if h.get("replaced"):
        notes.append(
            f"replaced {h['replaced']:,} invalid UTF-8 sequence(s) with U+FFFD in "
            f"{h['replaced_documents']:,} document(s)"
        )
    if h.get("null_rows"):
        notes.append(f"skipped {h['null_rows']:,} row(s) whose text is null")
    return "; " + "; ".join(notes) if notes else ""


def _open_split(folder: str, split: dict, dtype: np.dtype, eos_id: int) -> TokenShards:
    files = [os.path.join(folder, s["file"]) for s in split["shards"]]
    return TokenShards(files, [s["tokens"] for s in split["shards"]], dtype, eos_id)


def _read_valid_meta(folder: str, key: str) -> dict | None:
    """The entry's meta if it is complete and matches `key`, else None (and a broken entry is removed)."""
    if not os.path.isdir(folder):
        return None
    try:
        with open(os.path.join(folder, "meta.json")) as f:
            meta = json.load(f)
        ok = meta["format_version"] == FORMAT_VERSION and meta["key"] == key
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in meta["splits"].values():
            for shard in split["shards"] if split is not None else ():
                ok = ok and os.path.getsize(os.path.join(folder, shard["file"])) == shard["tokens"] * itemsize
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if ok:
        return meta
    # Only reachable by hand-editing the cache (entries are renamed into place complete).
    log.warning("removing invalid cache entry %s", folder)
    shutil.rmtree(folder, ignore_errors=True)
    return None


# ---------------------------------------------------------------------------- building an entry


@contextmanager
def _build_lock(parent: str, key: str):
    """One process builds a given entry at a time (two runs on the same data share the work instead)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; concurrent builds are still safe, only duplicated
        yield
        return
    with open(os.path.join(parent, f".lock-{key[:32]}"), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process that is tokenizing the same data (%s)", f.name)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(
    folder: str, parent: str, key: str, corpus: Corpus, tok: Tokenizer, val_fraction: float, workers: int
) -> tuple[dict, bool]:
    """(meta, whether another process built it while this one waited)."""
    remove_stale(parent)
    with _build_lock(parent, key):
        meta = _read_valid_meta(folder, key)
        if meta is not None:  # built by the process we waited for
            return meta, True
        partial = os.path.join(parent, f".partial-{key[:32]}")
        pieces = plan_pieces(corpus)
        dtype = token_dtype(tok.vocab_size)
        _open_partial(partial, key, pieces)
        job = TokenizeJob(corpus.sources, corpus.text_field, tok, dtype.name, val_fraction, partial)
        records = _completed(partial, pieces, dtype.itemsize)
        reused = len(records)
        todo = [p for p in pieces if p.index not in records]
        total = sum(p.n_bytes for p in pieces)
        progress = TokenizeProgress(total, done_bytes=sum(pieces[i].n_bytes for i in records))
        try:
            records.update(run_pieces(job, todo, workers, progress))
        finally:
            progress.close()
        _apply_split_guarantees(job, pieces, records, val_fraction)

        n_docs = sum(r["n_docs"] for r in records.values())
        n_tokens = sum(r["tokens"]["train"] + r["tokens"]["val"] for r in records.values())
        if n_docs == 0 or n_tokens == n_docs:  # nothing but the EOS after each document
            shutil.rmtree(partial, ignore_errors=True)
            raise DataError(f"data.path {corpus.spec!r} is an empty corpus: its {n_docs} documents hold no text")

        tmp = make_temp_dir(parent, f".tmp-{key[:16]}-")
        try:
            meta = _assemble(tmp, partial, pieces, records, corpus, tok, val_fraction, dtype)
            meta["key"] = key
            meta["build"] = {
                "pieces": len(pieces),
                "pieces_reused": reused,
                "input_bytes": sum(p.n_bytes for p in todo),
                "processes": max(1, min(workers, len(todo))),
            }
            tok.save(os.path.join(tmp, "tokenizer"))
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(meta, f, indent=1)
            try:
                os.rename(tmp, folder)
            except OSError:
                # A concurrent run without a lock (Windows) published the same entry first; use theirs.
                if _read_valid_meta(folder, key) is None:
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(partial, ignore_errors=True)
        return meta, False


def _open_partial(partial: str, key: str, pieces: list) -> None:
    """Create the pieces folder, or keep the one an earlier run left if it was cut the same way."""
    plan = {"format_version": FORMAT_VERSION, "key": key, "pieces": [p.to_json() for p in pieces]}
    plan_file = os.path.join(partial, "plan.json")
    try:
        with open(plan_file) as f:
            if json.load(f) == plan:
                return
    except (OSError, ValueError):
        pass
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    with open(plan_file + ".tmp", "w") as f:
        json.dump(plan, f)
    os.replace(plan_file + ".tmp", plan_file)


def _completed(partial: str, pieces: list, itemsize: int) -> dict[int, dict]:
    """Records of the pieces an earlier run finished (their .json exists and the files match it)."""
    records = {}
    for piece in pieces:
        try:
            with open(piece_file(partial, piece.index, "json")) as f:
                record = json.load(f)
            if all(
                os.path.getsize(piece_file(partial, piece.index, s)) == record["tokens"][s] * itemsize
                for s in ("train", "val")
            ):
                records[piece.index] = record
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return records


def _apply_split_guarantees(job: TokenizeJob, pieces: list, records: dict[int, dict], val_fraction: float) -> None:
    """A val split whenever there are two documents, a train split whenever there is one (split.ValSplit's
    rules, decided over the whole corpus): redo the piece holding a document they move."""
    want: dict[int, tuple] = {i: (None, None) for i in records}
    if val_fraction > 0:
        n = sum(r["n_docs"] for r in records.values())
        n_below = sum(r["n_below"] for r in records.values())
        with_docs = [r for r in records.values() if r["lowest"] is not None]
        if n >= 2 and n_below == 0:
            r = min(with_docs, key=lambda r: r["lowest"])
            want[r["index"]] = (r["lowest"][1], None)
        if n >= 1 and n_below == n:
            r = max(with_docs, key=lambda r: r["highest"])
            want[r["index"]] = (want[r["index"]][0], r["highest"][1])
    for index, (force_val, force_train) in want.items():
        record = records[index]
        if (record.get("force_val"), record.get("force_train")) != (force_val, force_train):
            records[index] = tokenize_piece(job, pieces[index], force_val=force_val, force_train=force_train)


def _assemble(
    tmp: str,
    partial: str,
    pieces: list,
    records: dict,
    corpus: Corpus,
    tok: Tokenizer,
    val_fraction: float,
    dtype: np.dtype,
) -> dict:
    splits = {}
    for side in ("train", "val"):
        files = [piece_file(partial, p.index, side) for p in pieces if records[p.index]["tokens"][side]]
        documents = sum(r["documents"][side] for r in records.values())
        shards = write_shards(tmp, side, files, dtype)
        splits[side] = {"shards": shards, "tokens": sum(s["tokens"] for s in shards), "documents": documents}
    if splits["val"]["documents"] == 0:
        splits["val"] = None
    read = readers.ReadStats()
    for r in records.values():
        read.add(r["read"])
    return {
        "format_version": FORMAT_VERSION,
        "dtype": dtype.name,
        "n_documents": sum(r["n_docs"] for r in records.values()),
        "splits": splits,
        "val_fraction": val_fraction,
        "text_field": corpus.text_field,
        "tokenizer": {
            "kind": "byte" if isinstance(tok, ByteTokenizer) else "hf",
            "fingerprint": tok.fingerprint,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
        },
        "sources": {"path": corpus.spec, "files": [[s.name, s.digest, s.size] for s in corpus.sources]},
        "hygiene": {"binary_files": [s.name for s in corpus.skipped], **read.as_dict()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def prepare_mixture(
    path: str, weights, tokenizer, vocab_size: int, val_fraction: float, cache_dir: str, text_field: str, workers: int
) -> PreparedData:
    """A TokenMixture of the comma-separated entries of `path`, each tokenized and cached on its own
    (trainer/data/mixture.py), with one tokenizer for all: trained on their union for "bpe"."""
    t0 = time.time()
    entries = split_path(path)
    shares = parse_weights(weights, entries)
    memo = os.path.join(cache_dir, HASH_MEMO_DIR)
    corpora = [resolve_corpus(entry, text_field, hash_memo=memo) for entry in entries]
    for corpus in corpora:
        check_not_empty(corpus)
    union = union_corpus(path, corpora, text_field)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else build_tokenizer(tokenizer, union, vocab_size, cache_dir)
    parts = [prepare_corpus(corpus, tok, val_fraction, cache_dir, workers) for corpus in corpora]
    train = TokenMixture(entries, shares, [p.train for p in parts])
    vals = [p.val for p in parts if p.val is not None]
    val = None
    if vals:  # evaluation sees every source's held-out documents, source by source
        val = TokenShards(
            [f for v in vals for f in v.files], [len(m) for v in vals for m in v.shards], vals[0].dtype, tok.eos_id
        )
    described = [f"{e!r} weight {w:.3g}, {len(p.train):,} train tokens" for e, w, p in zip(entries, shares, parts)]
    log.info("mixture of %d sources in %.1fs: %s", len(entries), time.time() - t0, "; ".join(described))
    meta = {"mixture": [{"path": e, "weight": w, "cache": p.cache_path} for e, w, p in zip(entries, shares, parts)]}
    return PreparedData(
        tok,
        train,
        val,
        os.path.join(cache_dir, "datasets"),
        sum(p.n_documents for p in parts),
        meta,
        all(p.from_cache for p in parts),
        parts,
    )
