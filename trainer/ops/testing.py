"""Helpers the kernel and op tests share (kept in the library so any test module can import them).

The fp64 oracles themselves live in the tests.
"""

import contextlib
import os

import torch


def kernel_test_device() -> torch.device:
    """Where kernel tests put their tensors: CUDA when a GPU is there and triton compiles for it
    (TRITON_INTERPRET unset or 0), else the CPU through the Triton interpreter."""
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return torch.device("cuda" if torch.cuda.is_available() and not interpreting else "cpu")


def compiled_gpu_skip_reason() -> str | None:
    """Why the GPU tests cannot run here (None when they can): they need a CUDA device and Triton
    compiling for it rather than interpreting."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU with compiled Triton; this machine has no CUDA device"
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "needs compiled Triton; TRITON_INTERPRET is set, so kernels would be interpreted"
    return None


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| over the whole tensor, in fp64: the project's tolerance measure.

    A zero reference falls back to the absolute norm of the difference.
    """
    out, ref = out.detach().double(), ref.detach().double()
    diff = (out - ref).norm().item()
    scale = ref.norm().item()
    return diff / scale if scale > 0 else diff


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() or t.is_complex():
        return t.fill_(float("nan"))
    if t.dtype == torch.bool:
        return t.fill_(True)
    return t.fill_(torch.iinfo(t.dtype).max)


@contextlib.contextmanager
def poisoned_allocations():
    """While active, torch.empty / torch.empty_like / Tensor.new_empty return NaN-filled tensors
    (integers: their largest value), so an output element that a kernel forgets to write shows up
    as NaN in the result instead of passing by luck on zeroed memory."""
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty
    torch.empty = lambda *a, **k: _poison(empty(*a, **k))
    torch.empty_like = lambda *a, **k: _poison(empty_like(*a, **k))
    torch.Tensor.new_empty = lambda self, *a, **k: _poison(new_empty(self, *a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.Tensor.new_empty = empty, empty_like, new_empty
