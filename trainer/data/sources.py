"""Turn a data `path` string into a sorted list of source files, and read documents from them.

A corpus is identified by the relative names and content hashes of its files, so the same
data copied to another folder shares a cache entry, and a changed file invalidates it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from typing import Iterator

from .errors import DataError

TEXT_EXTENSIONS = (".txt", ".md", ".rst", ".py", ".jsonl")
BUILTIN_STDLIB = "builtin:python-stdlib"

ACCEPTED = (
    "a text file; a folder (searched recursively for "
    + " ".join(TEXT_EXTENSIONS)
    + " files, hidden folders skipped); a glob pattern such as 'data/**/*.jsonl'; "
    f"a comma-separated list of these; or '{BUILTIN_STDLIB}'"
)


@dataclass(frozen=True)
class Source:
    path: str  # absolute path, used to read the file
    name: str  # path relative to its input root: the identity used by the val split and the cache key
    digest: str  # sha256 of the file's bytes
    size: int

    @property
    def is_jsonl(self) -> bool:
        return self.path.lower().endswith(".jsonl")


@dataclass(frozen=True)
class Corpus:
    spec: str
    sources: tuple[Source, ...]
    text_field: str = "text"

    @property
    def n_bytes(self) -> int:
        return sum(s.size for s in self.sources)

    @property
    def fingerprint(self) -> str:
        """Content hash of the corpus: what a cache built from it depends on."""
        key = {
            "files": [[s.name, s.digest] for s in self.sources],
            "text_field": self.text_field if any(s.is_jsonl for s in self.sources) else None,
        }
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()

    def document_ids(self) -> Iterator[str]:
        """The ids `documents()` will yield, without parsing JSON (cheap first pass for the val split)."""
        for src in self.sources:
            if not src.is_jsonl:
                yield src.name
                continue
            with open(src.path, "rb") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        yield f"{src.name}:{lineno}"

    def documents(self) -> Iterator[tuple[str, str, int]]:
        """Yield (doc_id, text, n_bytes_read) in corpus order; n_bytes_read feeds progress bars."""
        for src in self.sources:
            if not src.is_jsonl:
                with open(src.path, "rb") as f:
                    data = f.read()
                yield src.name, data.decode("utf-8", errors="replace"), len(data)
                continue
            # Line by line: a jsonl file may be far larger than memory.
            with open(src.path, "rb") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    text = _jsonl_text(line, src.path, lineno, self.text_field)
                    yield f"{src.name}:{lineno}", text, len(line)


def _jsonl_text(line: bytes, path: str, lineno: int, text_field: str) -> str:
    try:
        obj = json.loads(line.decode("utf-8", errors="replace"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict) or text_field not in obj:
        keys = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise DataError(
            f"{path}, line {lineno}: no {text_field!r} field (found: {keys}); "
            "set text_field to the key that holds the document text"
        )
    text = obj[text_field]
    if not isinstance(text, str):
        raise DataError(
            f"{path}, line {lineno}: field {text_field!r} is a {type(text).__name__}, expected a string"
        )
    return text


def resolve_corpus(spec: str, text_field: str = "text") -> Corpus:
    """Find and hash every file named by `spec` (see ACCEPTED). Raises DataError if nothing matches."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty data path {spec!r}; accepted: {ACCEPTED}")
    # A real file whose name contains a comma is not a list.
    entries = [spec] if os.path.exists(os.path.expanduser(spec)) else [e.strip() for e in spec.split(",")]
    found: dict[str, tuple[str, str]] = {}  # realpath -> (abspath, name); dedups overlapping entries
    for entry in entries:
        if not entry:
            continue
        matches = _expand(entry)
        if not matches:
            raise DataError(f"data path {entry!r} matched no files; accepted: {ACCEPTED}")
        for abspath, name in matches:
            found.setdefault(os.path.realpath(abspath), (abspath, name))
    if not found:
        raise DataError(f"data path {spec!r} matched no files; accepted: {ACCEPTED}")
    sources = [_hash_file(p, n) for p, n in found.values()]
    # Sorted by identity so the key and the stream order depend only on names and contents.
    sources.sort(key=lambda s: (s.name, s.digest, s.path))
    return Corpus(spec=spec, sources=tuple(sources), text_field=text_field)


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


def _walk(folder: str, root: str, extensions=TEXT_EXTENSIONS, skip_dirs=()) -> list[tuple[str, str]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__" and d not in skip_dirs]
        for fn in filenames:
            if not fn.startswith(".") and fn.lower().endswith(extensions):
                full = os.path.join(dirpath, fn)
                out.append((os.path.abspath(full), os.path.relpath(full, root)))
    return out


def _stdlib_files() -> list[tuple[str, str]]:
    root = sysconfig.get_paths()["stdlib"]
    files = _walk(root, root, extensions=(".py",), skip_dirs=("test", "tests"))
    # Installed packages and the IDLE GUI are not "the standard library as code to learn from".
    top_skip = ("site-packages", "dist-packages", "idlelib")
    return [(p, n) for p, n in files if n.split(os.sep)[0] not in top_skip]


def _hash_file(path: str, name: str) -> Source:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return Source(path=path, name=name, digest=h.hexdigest(), size=size)
