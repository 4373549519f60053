"""Measured peak memory of real training steps on CPU: the ground truth the planner is checked against.

The CPU allocator reports every allocation and free to torch's profiler when it runs with
`profile_memory=True` (c10's ProfiledCPUMemoryReporter). Replaying those events gives the bytes of
tensor storage alive at every moment, which is what a CUDA caching allocator's
`max_memory_allocated` counts on a GPU (without its 512-byte rounding): parameters, gradients,
optimizer states, saved activations, the data batches and every temporary, including those made
inside custom ops and C++ kernels. Python objects, the interpreter and numpy arrays are not
tensors and are not counted (unlike RSS).

Only the allocations made inside training steps count towards the peak (from the callback's
on_step_begin to its on_step_end; evaluation and checkpoint saving happen outside), but everything
allocated earlier in the run and still alive (the model, the optimizer state) is part of the total.
The run goes through the public API: `Trainer(config, callbacks=[...]).train()` and a callback.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from trainer.callbacks import TrainerCallback

STEP_MARK = "trainer.plan::step"
FORWARD_MARK = "trainer.plan::forward"


class _MarkSteps(TrainerCallback):
    """Brackets each training step with a profiler range, so its allocations can be told apart."""

    def __init__(self):
        self._range = None

    def on_step_begin(self, config, state, control, **kwargs):
        self._range = record_function(STEP_MARK)
        self._range.__enter__()

    def on_step_end(self, config, state, control, **kwargs):
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None


class _MarkForwards(TrainerCallback):
    """Brackets each training forward (the model's forward, loss included, while it trains) with a
    profiler range: the planner's "forward" phase, against which its peak is compared."""

    def __init__(self):
        self._range = None
        self._handles = []

    def on_train_begin(self, config, state, control, model=None, **kwargs):
        def begin(module, args, kwargs_):
            if module.training:
                self._range = record_function(FORWARD_MARK)
                self._range.__enter__()

        def end(module, args, kwargs_, output):
            if self._range is not None:
                self._range.__exit__(None, None, None)
                self._range = None

        self._handles = [
            model.register_forward_pre_hook(begin, with_kwargs=True),
            model.register_forward_hook(end, with_kwargs=True),
        ]

    def on_train_end(self, config, state, control, **kwargs):
        for handle in self._handles:
            handle.remove()


@dataclass
class Measurement:
    peak_bytes: int  # the most tensor bytes alive at once during any training step
    step_peaks: list[int] = field(default_factory=list)  # the same, step by step
    step_start_bytes: list[int] = field(default_factory=list)  # alive when each step began
    peak_op: str = ""  # the op that made the peak's last allocation (for diagnosis)


def _walk(events):
    stack = list(events)
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        yield event


def _op_name(event) -> str:
    parent = event.parent
    names = []
    while parent is not None and len(names) < 3:
        names.append(parent.name)
        parent = parent.parent
    return " < ".join(names)


def replay(tree, mark: str = STEP_MARK) -> Measurement:
    """The step peaks from a profiler event tree (allocations and the step ranges; with
    mark=FORWARD_MARK, the ranges of the training forwards)."""
    from torch._C._profiler import _EventType

    allocations, steps = [], []
    for event in _walk(tree):
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            allocations.append(event)
        elif event.name == mark:
            steps.append((event.start_time_ns, event.end_time_ns))
    allocations.sort(key=lambda e: (e.start_time_ns, e.id))
    steps.sort()
    if not steps:
        raise RuntimeError("no training step was recorded")
    live: dict[int, int] = {}  # address -> bytes, for blocks allocated while recording
    total = 0
    step_peaks = [None] * len(steps)
    step_start = [None] * len(steps)
    peak_op = [""] * len(steps)
    index = 0  # the first step not yet finished
    for event in allocations:
        t = event.start_time_ns
        while index < len(steps) and t > steps[index][1]:
            if step_start[index] is None:  # no allocation inside this step
                step_start[index] = step_peaks[index] = total
            index += 1
        if index < len(steps) and t >= steps[index][0] and step_start[index] is None:
            step_start[index] = step_peaks[index] = total
        size, ptr = event.extra_fields.alloc_size, event.extra_fields.ptr
        if size > 0:
            live[ptr] = size
            total += size
        elif ptr in live:  # a free of a block allocated before recording began is not ours to count
            total -= live.pop(ptr)
        if index < len(steps) and steps[index][0] <= t <= steps[index][1] and total > step_peaks[index]:
            step_peaks[index] = total
            peak_op[index] = _op_name(event)
    for i in range(len(steps)):
        if step_start[i] is None:
            step_start[i] = step_peaks[i] = total
    best = max(range(len(steps)), key=lambda i: step_peaks[i])
    return Measurement(step_peaks[best], step_peaks, step_start, peak_op[best])


def measure_training_peak(config, callbacks=(), phase: str = "step") -> Measurement:
    """Trains `config` (on CPU) under the allocation recorder; returns the peak of its steps, or
    with phase="forward" of the training forwards alone (loss included; Plan.phase_peaks["forward"]).

    The Trainer is built inside the recording, so the model, the optimizer and the data batches
    are all counted from their first byte.
    """
    if phase not in ("step", "forward"):
        raise ValueError(f"phase must be step or forward, got {phase!r}")
    from trainer.loop import Trainer  # what `from trainer import Trainer` gives, from below the package

    if config.train.device == "cuda":
        raise ValueError(
            "measure_training_peak records the CPU allocator; on a GPU read torch.cuda.max_memory_allocated"
        )
    threads = torch.get_num_threads()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            marks = [_MarkSteps()] if phase == "step" else [_MarkForwards()]
            Trainer(config, callbacks=[*marks, *callbacks]).train()
    finally:
        torch.set_num_threads(threads)  # train.threads changes it for the whole process
    return replay(
        prof.profiler.kineto_results.experimental_event_tree(), STEP_MARK if phase == "step" else FORWARD_MARK
    )


# ---------------------------------------------------------------- the process's resident memory


def _status_bytes(key: str) -> int:
    """A /proc/self/status figure in bytes (VmRSS: resident now; VmHWM: the most resident since the
    process began or since reset_peak_rss)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # the kernel writes kB
    raise RuntimeError(f"/proc/self/status has no {key}")


def reset_peak_rss() -> None:
    """Sets VmHWM back to the present VmRSS (Linux >= 4.0: proc(5), /proc/pid/clear_refs, value 5)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


class _PeakRss(TrainerCallback):
    """VmHWM at the end of each training step: the process's most resident memory up to then."""

    def __init__(self):
        self.step_peaks: list[int] = []

    def on_step_end(self, config, state, control, **kwargs):
        self.step_peaks.append(_status_bytes("VmHWM"))


@dataclass
class RssMeasurement:
    before_bytes: int  # VmRSS just before the Trainer was built
    peak_bytes: int  # VmHWM at the end of the last training step
    step_peaks: list[int] = field(default_factory=list)  # VmHWM at each step's end

    @property
    def growth_bytes(self) -> int:
        return self.peak_bytes - self.before_bytes


def measure_training_rss(config, callbacks=()) -> RssMeasurement:
    """Trains `config` on CPU (Linux) and returns the process's peak resident memory up to the end
    of its last step, and what was resident before the Trainer was built. What it counts beyond
    the tensors: the allocator's cached and fragmented heap, the interpreter's objects and the
    modules imported while the run is built, the data pipeline (tokenizer, token cache pages, the
    prefetched batches), autograd's and the threads' own memory. Meant for a fresh process: memory
    an earlier run left in the allocator's heap would be reused and hide part of the growth."""
    from trainer.loop import Trainer

    if config.train.device == "cuda":
        raise ValueError("measure_training_rss measures a CPU run's resident memory")
    peaks = _PeakRss()
    threads = torch.get_num_threads()
    reset_peak_rss()
    before = _status_bytes("VmRSS")
    try:
        Trainer(config, callbacks=[peaks, *callbacks]).train()
    finally:
        torch.set_num_threads(threads)
    return RssMeasurement(before, peaks.step_peaks[-1], peaks.step_peaks)
