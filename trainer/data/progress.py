"""Progress of a long tokenization: a tqdm bar on a terminal, a plain line every so often in a log file."""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("trainer.data")
LINE_EVERY_S = 30.0


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_time(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class TokenizeProgress:
    """update(bytes, documents) as input is tokenized; bytes and documents per second, and the time left."""

    def __init__(self, total_bytes: int, done_bytes: int = 0, desc: str = "tokenizing"):
        self.total, self.done, self.docs = total_bytes, done_bytes, 0
        self.start_done = done_bytes
        self.t0 = self.last_line = time.time()
        self.desc = desc
        self.bar = None
        if sys.stderr.isatty():
            self.bar = tqdm(
                total=total_bytes, initial=done_bytes, unit="B", unit_scale=True, desc=desc, dynamic_ncols=True
            )

    def update(self, n_bytes: int, n_docs: int) -> None:
        self.done += n_bytes
        self.docs += n_docs
        now = time.time()
        if self.bar is not None:
            self.bar.update(n_bytes)
            self.bar.set_postfix_str(f"{self.docs / max(now - self.t0, 1e-9):,.0f} docs/s", refresh=False)
        elif now - self.last_line >= LINE_EVERY_S:
            self.last_line = now
            emit(logging.INFO, self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.time()) - self.t0, 1e-9)
        rate = (self.done - self.start_done) / elapsed
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        percent = 100 * self.done / self.total if self.total else 100.0
        eta = human_time(left) if left == left else "?"
        return (
            f"{self.desc}: {percent:.0f}% ({human_bytes(self.done)} of {human_bytes(self.total)}), "
            f"{human_bytes(rate)}/s, {self.docs / elapsed:,.0f} docs/s, {eta} left"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def emit(level: int, message: str) -> None:
    """Log a line of trainer.data. If the application configured no logging at all, give this logger a
    stderr handler first, so the line is not lost to Python's warning-only fallback."""
    if not log.hasHandlers():
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        log.addHandler(handler)
        if log.level == logging.NOTSET:
            log.setLevel(logging.INFO)
    log.log(level, message)
