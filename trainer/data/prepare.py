"""prepare_data: corpus -> tokenizer -> one flat token file per split, cached by content hash.

Cache layout (cache_dir defaults to $TRAINER_CACHE_DIR, else ~/.cache/trainer):
    tokenizers/bpe-<vocab>-<corpus hash>/tokenizer.json       trained BPE tokenizers
    datasets/<key>/train.bin, val.bin                          raw uint16/uint32 tokens
    datasets/<key>/meta.json                                   dtype, counts, fingerprint, sources
    datasets/<key>/tokenizer/                                  the tokenizer that made them
Each entry is built in a `.tmp-*` folder and renamed into place when complete, so a killed run
never leaves a partial entry that a later run trusts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from .errors import DataError
from .sources import Corpus, resolve_corpus
from .split import ValSplit
from .tokenizer import ByteTokenizer, Tokenizer, build_tokenizer

FORMAT_VERSION = 1
log = logging.getLogger("trainer.data")

# Documents per encode_batch call, and a byte cap so one batch of huge files stays small in memory.
BATCH_DOCS = 1024
BATCH_BYTES = 8 << 20
STALE_TMP_SECONDS = 24 * 3600


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    train: np.memmap
    val: np.memmap | None
    cache_path: str
    n_documents: int
    meta: dict = field(repr=False, default_factory=dict)
    from_cache: bool = False


def default_cache_dir() -> str:
    return os.environ.get("TRAINER_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "trainer")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def cache_key(corpus: Corpus, tokenizer: Tokenizer, val_fraction: float) -> str:
    blob = {
        "format_version": FORMAT_VERSION,
        "corpus": corpus.fingerprint,  # file names + content hashes (+ text_field for jsonl)
        "tokenizer": tokenizer.fingerprint,
        "val_fraction": repr(float(val_fraction)),
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def prepare_data(
    path: str,
    tokenizer: str | Tokenizer = "bpe",
    vocab_size: int = 4096,
    val_fraction: float = 0.01,
    cache_dir: str | None = None,
    text_field: str = "text",
) -> PreparedData:
    """Tokenize `path` once (see sources.ACCEPTED for what it may be) and memory-map the result.

    `tokenizer` is "byte", "bpe", a tokenizer.json path, or a Tokenizer instance.
    """
    t0 = time.time()
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
    corpus = resolve_corpus(path, text_field)
    if corpus.n_bytes == 0:
        raise DataError(f"data path {path!r} is an empty corpus: its {len(corpus.sources)} file(s) are all empty")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else build_tokenizer(tokenizer, corpus, vocab_size, cache_dir)

    key = cache_key(corpus, tok, val_fraction)
    parent = os.path.join(cache_dir, "datasets")
    folder = os.path.join(parent, key[:32])
    meta = _read_valid_meta(folder, key)
    from_cache = meta is not None
    if not from_cache:
        meta = _build(folder, parent, key, corpus, tok, val_fraction)

    dtype = np.dtype(meta["dtype"])
    train = _memmap(folder, meta["splits"]["train"], dtype, tok.eos_id)
    val = _memmap(folder, meta["splits"]["val"], dtype, tok.eos_id) if meta["splits"]["val"] else None
    n_val = meta["splits"]["val"]["tokens"] if val is not None else 0
    _info(
        f"{'used cache' if from_cache else 'tokenized'} {path!r}: {meta['n_documents']} documents, "
        f"{len(train):,} train + {n_val:,} val tokens ({dtype.name}, vocab {tok.vocab_size}) "
        f"in {time.time() - t0:.1f}s; cache {folder}"
    )
    if val_fraction > 0 and val is None:
        log.warning("val_fraction=%s but the corpus has a single document: no validation split", val_fraction)
    return PreparedData(tok, train, val, folder, meta["n_documents"], meta, from_cache)


def _memmap(folder: str, split: dict, dtype: np.dtype, eos_id: int) -> np.memmap:
    tokens = np.memmap(os.path.join(folder, split["file"]), dtype=dtype, mode="r", shape=(split["tokens"],))
    # The stream carries its EOS so BlockLoader(document_ids=True) needs no separate eos_id.
    tokens.eos_id = eos_id
    return tokens


def _read_valid_meta(folder: str, key: str) -> dict | None:
    """The entry's meta if it is complete and matches `key`, else None (and a broken entry is removed)."""
    meta_file = os.path.join(folder, "meta.json")
    if not os.path.isdir(folder):
        return None
    try:
        with open(meta_file) as f:
            meta = json.load(f)
        ok = meta["format_version"] == FORMAT_VERSION and meta["key"] == key
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in meta["splits"].values():
            if split is not None:
                ok = ok and os.path.getsize(os.path.join(folder, split["file"])) == split["tokens"] * itemsize
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if ok:
        return meta
    # Only reachable by hand-editing the cache (entries are renamed into place complete).
    log.warning("removing invalid cache entry %s", folder)
    shutil.rmtree(folder, ignore_errors=True)
    return None


def _build(folder: str, parent: str, key: str, corpus: Corpus, tok: Tokenizer, val_fraction: float) -> dict:
    os.makedirs(parent, exist_ok=True)
    _remove_stale_tmp(parent)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{key[:16]}-")
    try:
        meta = _tokenize_into(tmp, corpus, tok, val_fraction)
        meta["key"] = key
        tok.save(os.path.join(tmp, "tokenizer"))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        try:
            os.rename(tmp, folder)
        except OSError:
            # A concurrent run (e.g. another rank) published the same entry first; use theirs.
            if _read_valid_meta(folder, key) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def _remove_stale_tmp(parent: str) -> None:
    # Temp folders of killed runs are never read; after a day they cannot belong to a live run.
    now = time.time()
    for name in os.listdir(parent):
        p = os.path.join(parent, name)
        if name.startswith(".tmp-") and now - os.path.getmtime(p) > STALE_TMP_SECONDS:
            shutil.rmtree(p, ignore_errors=True)


def _tokenize_into(folder: str, corpus: Corpus, tok: Tokenizer, val_fraction: float) -> dict:
    """Stream every document, tokenized and followed by EOS, into train.bin / val.bin."""
    split = ValSplit(corpus.document_ids(), val_fraction)
    if split.n_documents == 0:
        raise DataError(f"data path {corpus.spec!r} is an empty corpus: no documents in its {len(corpus.sources)} file(s)")

    dtype = token_dtype(tok.vocab_size)
    eos = np.array([tok.eos_id], dtype=dtype)
    stats = {s: {"file": f"{s}.bin", "tokens": 0, "documents": 0} for s in ("train", "val")}
    files = {s: open(os.path.join(folder, f"{s}.bin"), "wb") for s in stats}
    bar = tqdm(
        total=corpus.n_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not sys.stderr.isatty()
    )

    def flush(batch):
        arrays = tok.encode_batch_arrays([text for _, text in batch])
        parts = {"train": [], "val": []}
        for (doc_id, _), ids in zip(batch, arrays):
            s = "val" if split.is_val(doc_id) else "train"
            parts[s] += [ids.astype(dtype, copy=False), eos]
            stats[s]["documents"] += 1
        for s, p in parts.items():
            if p:
                chunk = np.concatenate(p)
                chunk.tofile(files[s])
                stats[s]["tokens"] += len(chunk)

    try:
        batch, batch_bytes = [], 0
        for doc_id, text, n_bytes in corpus.documents():
            batch.append((doc_id, text))
            batch_bytes += n_bytes
            if len(batch) >= BATCH_DOCS or batch_bytes >= BATCH_BYTES:
                flush(batch)
                bar.update(batch_bytes)
                batch, batch_bytes = [], 0
        if batch:
            flush(batch)
            bar.update(batch_bytes)
    finally:
        bar.close()
        for f in files.values():
            f.close()

    total_docs = stats["train"]["documents"] + stats["val"]["documents"]
    if stats["train"]["tokens"] + stats["val"]["tokens"] == total_docs:
        raise DataError(f"data path {corpus.spec!r} is an empty corpus: its {total_docs} documents hold no text")
    if stats["val"]["documents"] == 0:
        os.remove(os.path.join(folder, "val.bin"))
    return {
        "format_version": FORMAT_VERSION,
        "dtype": dtype.name,
        "n_documents": total_docs,
        "splits": {"train": stats["train"], "val": stats["val"] if stats["val"]["documents"] else None},
        "val_fraction": val_fraction,
        "text_field": corpus.text_field,
        "tokenizer": {
            "kind": "byte" if isinstance(tok, ByteTokenizer) else "hf",
            "fingerprint": tok.fingerprint,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
        },
        "sources": {"path": corpus.spec, "files": [[s.name, s.digest, s.size] for s in corpus.sources]},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _info(message: str) -> None:
    # The one line prepare_data promises. If the application configured no logging at all, give
    # this logger a stderr handler so the line is not lost to Python's warning-only fallback.
    if not log.hasHandlers():
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        log.addHandler(handler)
        if log.level == logging.NOTSET:
            log.setLevel(logging.INFO)
    log.info(message)
