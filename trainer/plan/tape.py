"""A ledger of the bytes alive during one training step, and the peak it reaches.

The planner replays a step (forward, backward, optimizer step) as allocations and frees of named
storages, each in a category of the breakdown (parameters, gradients, activations, ...). A
transient that exists only inside one op (a kernel's scratch buffers, a reference op's
intermediate tensors) is a `spike`: it raises the total for an instant without staying. The peak
keeps the breakdown of the moment it happened, so the report says what was alive at the peak,
not the sum of every term's own maximum.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class Peak:
    bytes: int = 0
    phase: str = ""
    what: str = ""  # the op or event that reached it
    breakdown: dict[str, int] = field(default_factory=dict)


class Tape:
    def __init__(self):
        self.storages: dict[str, tuple[int, str]] = {}  # name -> (bytes, category)
        self.by_category: dict[str, int] = defaultdict(int)
        self.total = 0
        self.phase = ""
        self.peak = Peak()
        self.phase_peaks: dict[str, Peak] = {}
        self.op_peaks: dict[str, int] = defaultdict(int)  # the most alive while each op (or event) ran
        self.allocated = 0  # every byte allocated, spikes included: how much the allocator is churned
        self._serial = 0
        self.log: list[tuple[str, int, int, str]] | None = None  # (phase, total, change, what) when tracing

    # ---------------------------------------------------------------- storages

    def fresh(self, prefix: str) -> str:
        """A unique storage name."""
        self._serial += 1
        return f"{prefix}#{self._serial}"

    def alloc(self, name: str, nbytes: int, category: str, what: str = "") -> str:
        if name in self.storages:
            raise KeyError(f"storage {name!r} is already alive")
        nbytes = int(nbytes)
        self.storages[name] = (nbytes, category)
        self.by_category[category] += nbytes
        self.total += nbytes
        self.allocated += nbytes
        self._observe(what or name, 0, "")
        if self.log is not None:
            self.log.append((self.phase, self.total, nbytes, what or name))
        return name

    def free(self, name: str) -> None:
        nbytes, category = self.storages.pop(name)
        self.by_category[category] -= nbytes
        self.total -= nbytes
        if self.log is not None:
            self.log.append((self.phase, self.total, -nbytes, name))

    def alive(self, name: str) -> bool:
        return name in self.storages

    def size(self, name: str) -> int:
        return self.storages[name][0]

    def recategorize(self, name: str, category: str) -> None:
        nbytes, old = self.storages[name]
        self.by_category[old] -= nbytes
        self.by_category[category] += nbytes
        self.storages[name] = (nbytes, category)

    def spike(self, nbytes: int, category: str, what: str) -> None:
        """`nbytes` more for an instant (an op's own temporaries), on top of what is alive."""
        if nbytes > 0:
            self.allocated += int(nbytes)
            self._observe(what, int(nbytes), category)
            if self.log is not None:
                self.log.append((self.phase, self.total + int(nbytes), 0, f"spike +{int(nbytes):,} {what}"))

    # ---------------------------------------------------------------- peaks

    def set_phase(self, phase: str) -> None:
        self.phase = phase

    def _observe(self, what: str, extra: int, extra_category: str) -> None:
        now = self.total + extra
        if now > self.op_peaks[what]:
            self.op_peaks[what] = now
        for peak in (self.peak, self.phase_peaks.setdefault(self.phase, Peak())):
            if now > peak.bytes:
                breakdown = {k: v for k, v in self.by_category.items() if v}
                if extra:
                    breakdown[extra_category] = breakdown.get(extra_category, 0) + extra
                peak.bytes, peak.phase, peak.what, peak.breakdown = now, self.phase, what, breakdown
