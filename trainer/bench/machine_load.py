"""How busy the machine was while a side ran: the share of its CPUs that other processes used.

A speed ratio measured while something else competes for the cores says more about that something
than about the trainer. /proc/stat gives the CPU time every process used; this process's children
(the side that ran) are subtracted, and the rest is the others'. Linux only: elsewhere None.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from pathlib import Path

# Beyond these, bench says its tokens/s ratios are not a quiet machine's figures.
OTHER_LOAD_LIMIT = 0.10  # a tenth of the machine's CPU time used by other processes
STEP_SPREAD_LIMIT = 0.25  # steady step times' standard deviation over their mean


def cpu_busy_seconds() -> float | None:
    """CPU seconds all processes on this machine have used since boot (None where /proc/stat is missing)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class OtherLoad:
    """Started before a child process runs and read after it was waited for: `share()` is the
    fraction of the machine's CPU time (all cores) that processes other than the children used."""

    def __init__(self):
        self.busy, self.ours, self.start = cpu_busy_seconds(), children_cpu_seconds(), time.perf_counter()

    def share(self) -> float | None:
        busy, wall = cpu_busy_seconds(), time.perf_counter() - self.start
        if busy is None or self.busy is None or wall <= 0:
            return None
        others = (busy - self.busy) - (children_cpu_seconds() - self.ours)
        return max(0.0, others) / (wall * (os.cpu_count() or 1))


def step_spread(step_seconds: list[float]) -> float | None:
    """Standard deviation over mean of the steps' times (None for fewer than two steps)."""
    if len(step_seconds) < 2:
        return None
    return statistics.pstdev(step_seconds) / statistics.fmean(step_seconds)


def untrusted_because(sides: dict[str, dict]) -> list[str]:
    """Why the sides' speed figures cannot be compared (empty when they can): each side's
    `other_cpu_share` and `step_time_spread` against the limits above."""
    reasons = []
    for side, figures in sides.items():
        share, spread = figures.get("other_cpu_share"), figures.get("step_time_spread")
        if share is not None and share > OTHER_LOAD_LIMIT:
            reasons.append(f"other processes used {share:.0%} of the CPUs during the {side} run")
        if spread is not None and spread > STEP_SPREAD_LIMIT:
            reasons.append(f"the {side} run's step times varied by {spread:.0%} (standard deviation over mean)")
    return reasons
