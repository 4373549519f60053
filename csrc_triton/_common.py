"""Launch-configuration helpers and the launch wrapper shared by the kernels of this package."""

from __future__ import annotations

import torch


def num_warps_for(block: int) -> int:
    # Enough threads that each keeps a few dozen elements of a row block in registers: fewer
    # warps spill on wide rows, more waste threads on narrow ones.
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def persistent_programs(device: torch.device, work_items: int) -> int:
    """How many programs a kernel that loops over rows (and keeps per-program partial sums) launches."""
    if device.type == "cuda":
        # Two programs per SM hide each other's load latency; more would only grow the partial-sum
        # buffer that is reduced afterwards.
        count = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        # The interpreter runs programs one after another: a few are enough to exercise the
        # per-program row loops and the reduction of partial sums.
        count = 4
    return max(1, min(work_items, count))


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """(..., cols) -> (rows, cols) with unit column stride, copying only when no such view exists."""
    cols = t.shape[-1] if t.dim() else 1
    try:
        rows = t.view(-1, cols)
    except RuntimeError:
        rows = t.reshape(-1, cols)
    return rows if cols <= 1 or rows.stride(1) == 1 else rows.contiguous()


class KernelCompileError(RuntimeError):
    """A kernel could not be compiled (or does not fit the GPU) for the configuration it was asked for."""


# csrc_triton.compile_check sets this to a function that records each launch instead of running it,
# so that it compiles exactly what the launch helpers choose. None in every ordinary process.
launch_hook = None


def launch(kernel, grid, args: tuple, meta: dict, shape: str):
    """kernel[grid](*args, **meta), with compile failures reported as one KernelCompileError line.

    `shape` describes the problem for that message (e.g. "rows=8192 cols=4096 bf16"); the GPU's
    architecture is added to it.
    """
    if launch_hook is not None:
        return launch_hook(kernel, grid, args, meta, shape)
    try:
        return kernel[grid](*args, **meta)
    except Exception as error:
        if not _is_compile_error(error):
            raise
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        raise KernelCompileError(
            f"Triton kernel {kernel_name(kernel)} cannot be compiled for {shape} on {arch_of(device)}: "
            f"{first_line(error)}; `python -m csrc_triton.compile_check` lists the registers, spills and shared "
            "memory of every configuration the launchers choose"
        ) from None


def kernel_name(kernel) -> str:
    return getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", repr(kernel))


def arch_of(device: torch.device | None) -> str:
    if device is None or device.type != "cuda":
        return "cpu (interpreter)"
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def _is_compile_error(error: Exception) -> bool:
    # Triton's compile errors (CompilationError, OutOfResources, PTXASError) share the base
    # TritonError; triton 3.2 raised a plain RuntimeError when ptxas failed.
    # The interpreter's own errors (InterpreterError) are bugs to see in full, not compile failures.
    try:
        from triton.errors import TritonError
        from triton.runtime.errors import InterpreterError
    except ImportError:
        TritonError = InterpreterError = ()  # noqa: N806
    if TritonError and isinstance(error, TritonError):
        return not isinstance(error, InterpreterError)
    return isinstance(error, RuntimeError) and "ptxas" in str(error).lower()
