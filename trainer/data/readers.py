"""Read the documents of one span of a source file, streamed: never a whole corpus, or file, in memory.

Every reader yields (doc_id, text, n_bytes, ends_document). doc_id is stable across machines and
runs (the val split hashes it): the file name for a text file, name:line for jsonl (1-based, as
editors count), name:row for parquet and Arrow (0-based, as `datasets` indexes). n_bytes is the
span's input consumed, for progress. Text that is not valid UTF-8 is decoded with U+FFFD in place
of each bad sequence and counted in ReadStats, never an error.
"""

from __future__ import annotations

import codecs
import gzip
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from .errors import DataError
from .pieces import Span, plan_pieces
from .sources import Corpus, Source, first_line, open_arrow

# A text file is one document. One longer than this is read and tokenized in line-aligned parts of
# this size, so memory stays bounded; tokens at the joins may differ from encoding it whole. Part of
# the cache key (it changes the tokens of such files).
TEXT_CHUNK_BYTES = 8 << 20
READ_CHUNK = 1 << 20
TABLE_BATCH_ROWS = 1024


@dataclass
class ReadStats:
    replaced: int = 0  # invalid UTF-8 sequences replaced by U+FFFD
    replaced_documents: int = 0
    null_rows: int = 0  # parquet/Arrow rows whose text is null: skipped

    def add(self, other: dict) -> None:
        for k, v in other.items():
            setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict:
        return {"replaced": self.replaced, "replaced_documents": self.replaced_documents, "null_rows": self.null_rows}


class _CountingReplace:
    """A codecs error handler: U+FFFD for each bad sequence, counted."""

    count = 0

    @classmethod
    def handle(cls, err: UnicodeDecodeError):
        cls.count += 1
        return "\ufffd", err.end


codecs.register_error("trainer-count-replace", _CountingReplace.handle)


def decode_utf8(data: bytes, stats: ReadStats) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        before = _CountingReplace.count
        text = data.decode("utf-8", errors="trainer-count-replace")
        stats.replaced += _CountingReplace.count - before
        stats.replaced_documents += 1
        return text


def corpus_documents(corpus: Corpus) -> Iterator[tuple[str, str, int]]:
    """Yield (doc_id, text, n_bytes_read) in corpus order, streamed (BPE training reads this).

    A text file longer than TEXT_CHUNK_BYTES comes as several texts with one doc_id.
    """
    stats = ReadStats()
    for piece in plan_pieces(corpus):
        for span in piece.spans:
            for doc_id, text, n_bytes, _ in read_span(corpus.sources[span.source], span, corpus.text_field, stats):
                yield doc_id, text, n_bytes


def read_span(source: Source, span: Span, text_field: str, stats: ReadStats) -> Iterator[tuple[str, str, int, bool]]:
    if source.kind == "text":
        return _text(source, stats)
    if source.is_jsonl:
        return _jsonl(source, span, text_field, stats)
    if source.kind in ("parquet", "arrow"):
        return _table(source, span, text_field, stats)
    raise AssertionError(f"unknown source kind {source.kind}")


def _open(source: Source):
    try:
        return open(source.path, "rb")
    except OSError as e:
        raise DataError(
            f"cannot read {source.path}: {e.strerror or e}; was it moved or deleted while tokenizing?"
        ) from None


# ---------------------------------------------------------------------------- text


def _text(source: Source, stats: ReadStats) -> Iterator[tuple[str, str, int, bool]]:
    with _open(source) as f:
        if source.size <= TEXT_CHUNK_BYTES:
            data = f.read()
            yield source.name, decode_utf8(data, stats), len(data), True
            return
        # A long file: parts cut after a newline (else at a character boundary), one document in all.
        replaced_before = stats.replaced_documents
        carry = b""
        while True:
            data = carry + f.read(TEXT_CHUNK_BYTES)
            at_end = len(data) <= len(carry) or f.peek(1) == b""
            cut = len(data) if at_end else _cut_point(data)
            part, carry = data[:cut], data[cut:]
            yield source.name, decode_utf8(part, stats), len(part), at_end
            if at_end:
                break
        # Counted once per document, however many of its parts had bad bytes.
        stats.replaced_documents = min(stats.replaced_documents, replaced_before + 1)


def _cut_point(data: bytes) -> int:
    cut = data.rfind(b"\n") + 1
    if cut > 0:
        return cut
    cut = len(data)
    # Back off over UTF-8 continuation bytes (10xxxxxx) so no character is split.
    while cut > len(data) - 4 and cut > 0 and (data[cut - 1] & 0xC0) == 0x80:
        cut -= 1
    if cut > 0 and data[cut - 1] >= 0xC0:
        cut -= 1  # the lead byte of the split character goes with it
    return cut or len(data)


# ---------------------------------------------------------------------------- jsonl


def jsonl_text(line: bytes, path: str, lineno: int, text_field: str, stats: ReadStats) -> str:
    try:
        obj = json.loads(decode_utf8(line, stats))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict) or text_field not in obj:
        keys = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise DataError(
            f"{path}, line {lineno}: no {text_field!r} field (found: {keys}); "
            "set data.text_field to the key that holds the document text"
        )
    text = obj[text_field]
    if not isinstance(text, str):
        raise DataError(
            f"{path}, line {lineno}: field {text_field!r} holds a value of type {type(text).__name__}, "
            "expected a string"
        )
    return text


def jsonl_lines(source: Source, span: Span | None = None) -> Iterator[tuple[int, bytes, int]]:
    """(line number, line, input bytes consumed) of a .jsonl, .jsonl.gz or .jsonl.zst file, blank lines
    included; a plain file's span gives just its byte range. Streamed line by line."""
    if source.kind == "jsonl":
        yield from _plain_lines(source, span)
        return
    import zstandard

    kind = "gzip" if source.kind == "jsonl.gz" else "zstd"
    lineno = 0
    with _open(source) as f:
        chunks = _gzip_chunks(f) if kind == "gzip" else _zstd_chunks(f)
        try:
            for line, n_bytes in iter_lines(chunks):
                lineno += 1
                yield lineno, line, n_bytes
        except (EOFError, OSError, zlib.error, zstandard.ZstdError) as e:
            raise DataError(
                f"{source.path} is not a readable {kind} file after line {lineno} "
                f"({first_line(e)}): it is corrupt or truncated; re-download or remove it"
            ) from None


def _plain_lines(source: Source, span: Span | None) -> Iterator[tuple[int, bytes, int]]:
    start, stop, lineno = (span.start, span.stop, span.first) if span is not None else (0, source.size, 1)
    with _open(source) as f:
        f.seek(start)
        offset = start
        for line in f:
            if offset >= stop:
                break
            offset += len(line)
            yield lineno, line, len(line)
            lineno += 1


def _jsonl(source: Source, span: Span, text_field: str, stats: ReadStats) -> Iterator[tuple[str, str, int, bool]]:
    skipped = 0  # bytes of blank lines, handed on with the next document
    for lineno, line, n_bytes in jsonl_lines(source, span):
        if not line.strip():
            skipped += n_bytes
            continue
        text = jsonl_text(line, source.path, lineno, text_field, stats)
        yield f"{source.name}:{lineno}", text, n_bytes + skipped, True
        skipped = 0


def _gzip_chunks(f) -> Iterator[tuple[bytes, int]]:
    """(decompressed chunk, compressed bytes consumed so far)."""
    with gzip.GzipFile(fileobj=f) as gz:
        while chunk := gz.read(READ_CHUNK):
            yield chunk, f.tell()


def _zstd_chunks(f) -> Iterator[tuple[bytes, int]]:
    """Like _gzip_chunks, frame by frame, so a truncated last frame is an error (zstandard's stream
    reader ends quietly on one)."""
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    frame, in_frame = dctx.decompressobj(), False
    while compressed := f.read(READ_CHUNK // 4):
        while compressed:
            out = frame.decompress(compressed)
            in_frame = True
            if frame.eof:
                compressed = frame.unused_data
                frame, in_frame = dctx.decompressobj(), False
            else:
                compressed = b""
            if out:
                yield out, f.tell()
    if in_frame:
        raise EOFError("the file ends inside a zstd frame")


def iter_lines(chunks: Iterator[tuple[bytes, int]]) -> Iterator[tuple[bytes, int]]:
    """Split decompressed chunks into lines; each with the compressed bytes consumed since the last line."""
    tail, reported, pos = b"", 0, 0
    for chunk, pos in chunks:
        lines = (tail + chunk).split(b"\n")
        tail = lines.pop()
        for line in lines:
            yield line + b"\n", pos - reported
            reported = pos
    if tail:
        yield tail, pos - reported


# ---------------------------------------------------------------------------- parquet and Arrow


def _table_batches(source: Source, span: Span, text_field: str):
    if source.kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(source.path)
        # use_threads=False: each tokenizing process is one core; Arrow's pool would oversubscribe.
        yield from pf.iter_batches(
            batch_size=TABLE_BATCH_ROWS,
            row_groups=list(range(span.start, span.stop)),
            columns=[text_field],
            use_threads=False,
        )
        return
    for i, batch in enumerate(open_arrow(source.path)):
        if i >= span.stop:
            return
        if i >= span.start:
            yield batch.select([text_field])


def _column_values(column, stats: ReadStats) -> list:
    import pyarrow as pa

    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        return [None if v is None else decode_utf8(v, stats) for v in column.to_pylist()]
    try:
        return column.to_pylist()
    except UnicodeDecodeError:  # a string column holding bytes that are not UTF-8
        return [None if v is None else decode_utf8(v, stats) for v in column.cast(pa.binary()).to_pylist()]


def _table(source: Source, span: Span, text_field: str, stats: ReadStats) -> Iterator[tuple[str, str, int, bool]]:
    import pyarrow as pa

    units = source.layout[span.start : span.stop]
    total_rows = sum(rows for rows, _ in units)
    total_bytes = span.n_bytes
    row, reported = span.first, 0
    kind = "parquet" if source.kind == "parquet" else "Arrow"
    try:
        for batch in _table_batches(source, span, text_field):
            values = _column_values(batch.column(0), stats)
            # The span's bytes, shared out by rows: exact in total, smooth enough for a progress bar.
            done = row - span.first + len(values)
            share = total_bytes * done // max(total_rows, 1) - reported
            reported += share
            for value in values:
                if value is None:
                    stats.null_rows += 1
                else:
                    yield f"{source.name}:{row}", value, share, True
                    share = 0
                row += 1
    except (pa.ArrowException, OSError) as e:
        raise DataError(
            f"{source.path} is not a readable {kind} file at row {row} ({first_line(e)}): it is "
            "corrupt or truncated; re-download or remove it"
        ) from None
