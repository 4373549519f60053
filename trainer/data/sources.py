"""Turn a data `path` string into a sorted list of source files, hashed and scanned once.

A corpus is identified by the relative names and content hashes of its files, so the same
data copied to another folder shares a cache entry, and a changed file invalidates it. The one
read pass that hashes a file also records what tokenization needs to cut it into independent
pieces: line-aligned byte offsets of a .jsonl file, the row groups of a parquet file, the record
batches of an Arrow file, and whether a text file looks binary.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
import time
from dataclasses import dataclass, field

from trainer.config import split_data_path

from .errors import DataError

TEXT_EXTENSIONS = (".txt", ".md", ".rst", ".py")
# Longest suffix first: "x.jsonl.gz" is gzip-compressed jsonl, not a text file named ".gz".
KIND_BY_SUFFIX = (
    (".jsonl.gz", "jsonl.gz"),
    (".jsonl.zst", "jsonl.zst"),
    (".jsonl", "jsonl"),
    (".parquet", "parquet"),
    (".arrow", "arrow"),
)
WALKED_SUFFIXES = TEXT_EXTENSIONS + (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
BUILTIN_STDLIB = "builtin:python-stdlib"

ACCEPTED = (
    "a file (" + " ".join(TEXT_EXTENSIONS) + " text, .jsonl, .jsonl.gz, .jsonl.zst, .parquet); a folder "
    "(searched recursively for those and for text files without an extension, hidden folders skipped) or a "
    "folder written by datasets' save_to_disk; "
    f"a glob pattern such as 'data/**/*.parquet'; a comma-separated list of these; or '{BUILTIN_STDLIB}'"
)

# How a file is judged binary (git's rule, widened): a NUL byte in its first SNIFF_BYTES, or more
# than a third of them neither printable nor UTF-8. Part of the cache key (BINARY_RULE).
SNIFF_BYTES = 8192
BINARY_RULE = "nul-or-third-nontext-in-8192"
HASH_CHUNK = 1 << 20
# A .jsonl file is cut into byte ranges, each starting at a line, of at least this size and about a
# 64th of the file (at most 64 MiB), so a huge file has a bounded number of cuts; pieces.py joins
# neighbouring ranges into pieces.
JSONL_SPLIT_BYTES = 1 << 20
# The hash memo (see _memoized_hash); the version changes whenever what _hash returns could.
HASH_MEMO_VERSION = 1
HASH_MEMO_DIR = "hashes"  # under the cache folder
HASH_MEMO_SETTLE_S = 2.0


@dataclass(frozen=True)
class Source:
    path: str  # absolute path, used to read the file
    name: str  # path relative to its input root: the identity used by the val split and the cache key
    digest: str  # sha256 of the file's bytes
    size: int
    kind: str = "text"  # text | jsonl | jsonl.gz | jsonl.zst | parquet | arrow
    binary: bool = False  # a text file that looks binary: skipped
    # Where the file can be cut (not identity: derived from the bytes). jsonl: (byte offset, line number)
    # of each range start; parquet/arrow: (rows, text bytes) of each row group / record batch.
    layout: tuple = field(default=(), compare=False, repr=False)

    @property
    def is_jsonl(self) -> bool:
        return self.kind.startswith("jsonl")

    @property
    def is_table(self) -> bool:
        return self.kind in ("parquet", "arrow")


@dataclass(frozen=True)
class Corpus:
    spec: str
    sources: tuple[Source, ...]  # what is read, in order
    text_field: str = "text"
    skipped: tuple[Source, ...] = ()  # text files that look binary

    @property
    def n_bytes(self) -> int:
        return sum(s.size for s in self.sources)

    @property
    def fingerprint(self) -> str:
        """Content hash of the corpus: what a cache built from it depends on."""
        key = {
            "files": [[s.name, s.digest] for s in self.sources],
            "text_field": self.text_field if any(s.is_jsonl or s.is_table for s in self.sources) else None,
        }
        if self.skipped:  # only then, so corpora without binary files keep their fingerprint
            key["skipped"] = [[s.name, s.digest] for s in self.skipped]
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()


def source_kind(path: str) -> str:
    low = path.lower()
    for suffix, kind in KIND_BY_SUFFIX:
        if low.endswith(suffix):
            return kind
    return "text"  # any other file named explicitly is read as text (the binary check still applies)


def split_path(spec: str) -> list[str]:
    """The comma-separated entries of a data path (a real file whose name holds a comma is one entry)."""
    return split_data_path(spec)


def resolve_corpus(spec: str, text_field: str = "text", hash_memo: str | None = None) -> Corpus:
    """Find, hash and scan every file named by `spec` (see ACCEPTED). Raises DataError if nothing matches.

    `hash_memo`, a folder (the cache's hashes/), keeps each file's hash beside its size, inode, mtime
    and ctime, so a restart over an unchanged corpus does not read it all again.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty data.path {spec!r}; accepted: {ACCEPTED}")
    found: dict[str, tuple[str, str]] = {}  # realpath -> (abspath, name); dedups overlapping entries
    for entry in split_path(spec):
        matches = _expand(entry)
        if not matches:
            raise DataError(f"data.path entry {entry!r} matched no files; accepted: {ACCEPTED}")
        for abspath, name in matches:
            found.setdefault(os.path.realpath(abspath), (abspath, name))
    if not found:
        raise DataError(f"data.path {spec!r} matched no files; accepted: {ACCEPTED}")
    scanned = [_scan(p, n, text_field, hash_memo) for p, n in found.values()]
    # Sorted by identity so the key and the stream order depend only on names and contents.
    scanned.sort(key=lambda item: (item[0].name, item[0].digest, item[0].path))
    _check_text_columns(scanned, text_field)
    sources = [s for s, _ in scanned]
    return Corpus(
        spec=spec,
        sources=tuple(s for s in sources if not s.binary),
        text_field=text_field,
        skipped=tuple(s for s in sources if s.binary),
    )


# ---------------------------------------------------------------------------- finding files


def _expand(entry: str) -> list[tuple[str, str]]:
    if entry == BUILTIN_STDLIB:
        return _stdlib_files()
    p = os.path.expanduser(entry)
    if any(c in p for c in "*?["):
        root = _glob_root(p)
        out = []
        for m in sorted(glob.glob(p, recursive=True)):
            if os.path.isdir(m):
                out += _walk(m, root)
            elif os.path.isfile(m):
                out.append((os.path.abspath(m), os.path.relpath(m, root)))
        return out
    if os.path.isdir(p):
        return _walk(p, p)
    if os.path.isfile(p):
        return [(os.path.abspath(p), os.path.basename(p))]
    return []


def _glob_root(pattern: str) -> str:
    """The folder before the first wildcard: names are made relative to it."""
    parts = pattern.split(os.sep)
    fixed = []
    for part in parts[:-1]:
        if any(c in part for c in "*?["):
            break
        fixed.append(part)
    return os.sep.join(fixed) or ("/" if pattern.startswith("/") else ".")


def _datasets_arrow_files(folder: str) -> list[str] | None:
    """The .arrow files of a folder written by datasets.Dataset.save_to_disk, in its order; None if it is not one."""
    if os.path.isfile(os.path.join(folder, "dataset_dict.json")):
        with open(os.path.join(folder, "dataset_dict.json")) as f:
            splits = json.load(f).get("splits", [])
        example = os.path.join(folder, splits[0]) if splits else os.path.join(folder, "train")
        raise DataError(
            f"{folder} is a DatasetDict saved with save_to_disk (splits: {', '.join(splits)}); point data.path "
            f"at one split's folder, e.g. {example}"
        )
    state = os.path.join(folder, "state.json")
    if not os.path.isfile(state):
        return None
    try:
        with open(state) as f:
            files = [d["filename"] for d in json.load(f)["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(
            f"{state} is not the state.json datasets' save_to_disk writes ({e}); re-save the "
            "dataset or point data.path at its files"
        ) from None
    missing = [n for n in files if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise DataError(f"{folder}: state.json lists {missing[0]}, which is missing; re-save the dataset")
    return [os.path.join(folder, n) for n in files]


def _walk(
    folder: str, root: str, suffixes=WALKED_SUFFIXES, skip_dirs=(), extensionless: bool = True
) -> list[tuple[str, str]]:
    """(path, name) of the files under `folder` with one of `suffixes`, and with `extensionless`
    those whose name has no extension (a licenses/ folder): read as text, unless their first bytes
    look binary (an executable), like any text file."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        arrow = _datasets_arrow_files(dirpath)
        if arrow is not None:  # a save_to_disk folder: its arrow files, nothing else, nothing below
            dirnames[:] = []
            out += [(os.path.abspath(p), os.path.relpath(p, root)) for p in arrow]
            continue
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__" and d not in skip_dirs]
        for fn in filenames:
            if not fn.startswith(".") and (fn.lower().endswith(suffixes) or (extensionless and _no_extension(fn))):
                full = os.path.join(dirpath, fn)
                out.append((os.path.abspath(full), os.path.relpath(full, root)))
    return out


def _no_extension(name: str) -> bool:
    """LICENSE, COPYING, GPL-3.0: no extension, or a version number where one would be."""
    extension = os.path.splitext(name)[1]
    return extension == "" or extension[1:].isdigit()


def _stdlib_files() -> list[tuple[str, str]]:
    root = sysconfig.get_paths()["stdlib"]
    files = _walk(root, root, suffixes=(".py",), skip_dirs=("test", "tests"), extensionless=False)
    # Installed packages and the IDLE GUI are not "the standard library as code to learn from".
    top_skip = ("site-packages", "dist-packages", "idlelib")
    return [(p, n) for p, n in files if n.split(os.sep)[0] not in top_skip]


# ---------------------------------------------------------------------------- hashing and scanning


def _scan(path: str, name: str, text_field: str, hash_memo: str | None) -> tuple[Source, tuple[list[str], str] | None]:
    """The Source, and for a table its (column names, text column kind) for the schema checks."""
    kind = source_kind(path)
    if hash_memo is None:
        digest, size, first, splits = _hash(path, find_line_splits=kind == "jsonl")
    else:
        digest, size, first, splits = _memoized_hash(path, kind == "jsonl", hash_memo)
    binary = kind == "text" and looks_binary(first)
    layout, schema = (), None
    if kind == "jsonl":
        layout = splits
    elif kind == "parquet":
        layout, schema = _parquet_layout(path, text_field)
    elif kind == "arrow":
        layout, schema = _arrow_layout(path, text_field)
    return Source(path, name, digest, size, kind, binary, layout), schema


def _hash(path: str, find_line_splits: bool) -> tuple[str, int, bytes, tuple]:
    """sha256, size, the first SNIFF_BYTES, and (for jsonl) line-aligned (offset, line number) cut points."""
    h = hashlib.sha256()
    size, lines, first = 0, 0, b""
    splits = [(0, 1)]
    try:
        split_bytes = max(JSONL_SPLIT_BYTES, min(64 << 20, os.path.getsize(path) // 64))
    except OSError:
        split_bytes = JSONL_SPLIT_BYTES
    try:
        with open(path, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                h.update(chunk)
                first = first or chunk[:SNIFF_BYTES]
                if find_line_splits:
                    if size + len(chunk) - splits[-1][0] >= split_bytes:
                        cut = chunk.rfind(b"\n") + 1  # 0: no line ends in this chunk, try the next
                        if cut > 0 and size + cut > splits[-1][0]:
                            splits.append((size + cut, lines + chunk.count(b"\n", 0, cut) + 1))
                    lines += chunk.count(b"\n")
                size += len(chunk)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    if len(splits) > 1 and splits[-1][0] >= size:
        splits.pop()  # a cut at the very end starts nothing
    return h.hexdigest(), size, first, tuple(splits)


def _stat_key(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    # ctime moves on every write and cannot be set back by the user (unlike mtime: touch -d, cp -p,
    # rsync -t), so a rewrite that keeps the size and the mtime still changes the key.
    return [st.st_size, st.st_ino, st.st_dev, st.st_mtime_ns, st.st_ctime_ns]


def _memoized_hash(path: str, find_line_splits: bool, memo_dir: str) -> tuple[str, int, bytes, tuple]:
    """_hash(path), read from memo_dir when the file's stat key is the one recorded with it.

    A memo is written only for a file last changed over HASH_MEMO_SETTLE_S before its hash was
    taken (git's "racy clean" rule): a write in the same clock tick as the hash could leave the
    stat key unchanged.
    """
    memo = os.path.join(memo_dir, hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:32] + ".json")
    key = {"version": HASH_MEMO_VERSION, "line_splits": find_line_splits and JSONL_SPLIT_BYTES, "stat": _stat_key(path)}
    try:
        with open(memo) as f:
            saved = json.load(f)
        if saved["key"] == key:
            with open(path, "rb") as f:
                first = f.read(SNIFF_BYTES)
            return saved["digest"], key["stat"][0], first, tuple(tuple(cut) for cut in saved["splits"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no memo, or an unreadable one: hash the file
    started = time.time_ns()
    digest, size, first, splits = _hash(path, find_line_splits)
    stat = key["stat"]
    settled = stat is not None and max(stat[3], stat[4]) < started - int(HASH_MEMO_SETTLE_S * 1e9)
    if settled and _stat_key(path) == stat and size == stat[0]:
        try:
            os.makedirs(memo_dir, exist_ok=True)
            tmp = f"{memo}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump({"key": key, "digest": digest, "splits": splits}, f)
            os.replace(tmp, memo)  # atomic: ranks sharing the cache may write the same memo
        except OSError:
            pass  # a read-only or full cache only costs the next start a re-hash
    return digest, size, first, splits


def looks_binary(head: bytes) -> bool:
    if b"\0" in head:
        return True
    if not head:
        return False
    text = head.decode("utf-8", errors="replace")
    if len(head) == SNIFF_BYTES:
        text = text[:-3]  # the sample may end inside a character
    control = sum(1 for c in text if (ord(c) < 32 and c not in "\t\n\r\f\v\b\x1b") or c == "\ufffd")
    return control * 3 > len(text)


def column_kind(arrow_type) -> str | None:
    """ "string" or "binary" for a column that can hold document text, else None."""
    import pyarrow as pa

    t = pa.types
    if t.is_string(arrow_type) or t.is_large_string(arrow_type) or str(arrow_type) == "string_view":
        return "string"
    if t.is_binary(arrow_type) or t.is_large_binary(arrow_type) or str(arrow_type) == "binary_view":
        return "binary"
    return None


def _schema_info(schema, text_field: str) -> tuple[list[str], str]:
    names = list(schema.names)
    if text_field not in names:
        return names, "missing"
    return names, column_kind(schema.field(text_field).type) or str(schema.field(text_field).type)


def _parquet_layout(path: str, text_field: str) -> tuple[tuple, tuple[list[str], str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        info = _schema_info(pf.schema_arrow, text_field)
        md = pf.metadata
        leaves = [j for j in range(md.num_columns) if md.schema.column(j).path.split(".")[0] == text_field]
        out = []
        for i in range(md.num_row_groups):
            rg = md.row_group(i)
            text_bytes = sum(rg.column(j).total_uncompressed_size for j in leaves) if leaves else rg.total_byte_size
            out.append((rg.num_rows, int(text_bytes)))
        return tuple(out), info
    except (pa.ArrowException, OSError) as e:
        raise DataError(
            f"{path} is not a readable parquet file ({first_line(e)}): it is corrupt or truncated; "
            "re-download or remove it"
        ) from None


def open_arrow(path: str):
    """A record batch reader over an Arrow IPC file (datasets writes the stream format; the file format works too)."""
    import pyarrow as pa

    mapped = pa.memory_map(path)
    try:
        return pa.ipc.open_stream(mapped)
    except pa.ArrowInvalid:
        return _FileBatches(pa.ipc.open_file(mapped))


class _FileBatches:
    """The Arrow random-access file format, read like a stream."""

    def __init__(self, reader):
        self.reader, self.schema = reader, reader.schema

    def __iter__(self):
        for i in range(self.reader.num_record_batches):
            yield self.reader.get_batch(i)


def _arrow_layout(path: str, text_field: str) -> tuple[tuple, tuple[list[str], str]]:
    import pyarrow as pa

    try:
        reader = open_arrow(path)
        info = _schema_info(reader.schema, text_field)
        out = []
        for batch in reader:
            text_bytes = batch.column(text_field).nbytes if info[1] != "missing" else 0
            out.append((batch.num_rows, int(text_bytes)))
        return tuple(out), info
    except (pa.ArrowException, OSError) as e:
        raise DataError(
            f"{path} is not a readable Arrow file ({first_line(e)}): it is corrupt or truncated; re-save or remove it"
        ) from None


def _check_text_columns(scanned: list[tuple[Source, tuple | None]], text_field: str) -> None:
    """Every table must hold the text column, as text; naming a shard that has it when another does not."""
    tables = [(s, info) for s, info in scanned if info is not None]
    good = [s for s, (_, kind) in tables if kind in ("string", "binary")]
    for source, (names, kind) in tables:
        if kind == "missing":
            unlike = f", unlike {good[0].path}: mixed schemas across shards" if good else ""
            raise DataError(
                f"{source.path} has no {text_field!r} column (its columns: {', '.join(names[:20]) or 'none'}){unlike}; "
                "set data.text_field to the column that holds the document text, or leave that file out"
            )
        if kind not in ("string", "binary"):
            raise DataError(
                f"{source.path}: column {text_field!r} holds {kind}, not text; set data.text_field to the "
                "column that holds the document text"
            )


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
