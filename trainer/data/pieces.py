"""Cut a corpus into pieces that tokenize independently, in corpus order.

A piece is a run of spans of about piece_size() bytes of input: several small files, one byte range
of a large .jsonl file (starting at a line), a run of parquet row groups or Arrow record batches, or
one whole compressed file (gzip and zstd streams cannot be entered in the middle). The cuts depend
only on the corpus, never on the number of workers, and documents never straddle two pieces, so
concatenating the pieces' tokens in order gives the same stream however many processes made them,
and a run resumed with another worker count still finds its finished pieces.
"""

from __future__ import annotations

from dataclasses import dataclass

# About TARGET_PIECES pieces per corpus, each between MIN and MAX bytes: many pieces keep every core
# busy to the end; the bounds keep per-piece overhead small and the number of files sane.
TARGET_PIECES = 1024
MIN_PIECE_BYTES = 1 << 20
MAX_PIECE_BYTES = 64 << 20
PIECE_BYTES: int | None = None  # a fixed size instead (tests use tiny pieces)


def piece_size(total_bytes: int) -> int:
    if PIECE_BYTES:
        return PIECE_BYTES
    return min(MAX_PIECE_BYTES, max(MIN_PIECE_BYTES, total_bytes // TARGET_PIECES))


@dataclass(frozen=True)
class Span:
    source: int  # index into Corpus.sources
    start: int  # jsonl: byte offset; parquet/arrow: first row group / record batch; else 0
    stop: int  # exclusive; jsonl: byte offset; parquet/arrow: row group / batch; else the file size
    first: int  # jsonl: line number at `start`; parquet/arrow: row index at `start`; else 0
    n_bytes: int  # input bytes, for progress and for sizing pieces


@dataclass(frozen=True)
class Piece:
    index: int
    spans: tuple[Span, ...]

    @property
    def n_bytes(self) -> int:
        return sum(s.n_bytes for s in self.spans)

    def to_json(self) -> list:
        return [[s.source, s.start, s.stop, s.first, s.n_bytes] for s in self.spans]


def source_spans(index: int, source) -> list[Span]:
    """The smallest spans a source can be cut into, in order."""
    if source.kind == "jsonl":
        cuts = list(source.layout) + [(source.size, None)]
        return [Span(index, a, b, line, b - a) for (a, line), (b, _) in zip(cuts, cuts[1:]) if b > a]
    if source.is_table:
        spans, row = [], 0
        for i, (rows, text_bytes) in enumerate(source.layout):
            spans.append(Span(index, i, i + 1, row, text_bytes))
            row += rows
        return spans
    return [Span(index, 0, source.size, 0, source.size)]


def _merge(spans: list[Span]) -> tuple[Span, ...]:
    """Join neighbouring spans of one source (consecutive row groups read as one range)."""
    out: list[Span] = []
    for s in spans:
        last = out[-1] if out else None
        if last is not None and last.source == s.source and last.stop == s.start:
            out[-1] = Span(s.source, last.start, s.stop, last.first, last.n_bytes + s.n_bytes)
        else:
            out.append(s)
    return tuple(out)


def plan_pieces(corpus) -> list[Piece]:
    spans = [span for index, source in enumerate(corpus.sources) for span in source_spans(index, source)]
    limit = piece_size(sum(s.n_bytes for s in spans))
    pieces: list[Piece] = []
    current: list[Span] = []
    size = 0
    for span in spans:
        current.append(span)
        size += span.n_bytes
        if size >= limit:
            pieces.append(Piece(len(pieces), _merge(current)))
            current, size = [], 0
    if current:
        pieces.append(Piece(len(pieces), _merge(current)))
    return pieces
