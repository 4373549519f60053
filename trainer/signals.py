"""SIGINT and SIGTERM during a run: the first finishes the step, saves and stops; a second stops at once."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable


class StopSignals:
    """While entered (in the main thread), SIGINT and SIGTERM set `received` and call `on_first`
    with the signal's name; a second one raises KeyboardInterrupt. The previous handlers come back
    on exit. In another thread (a library user's) signals stay as they were."""

    def __init__(self, on_first: Callable[[str], None]):
        self.on_first = on_first
        self.received: int | None = None
        self.previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.received = signum
        self.on_first(signal.Signals(signum).name)
