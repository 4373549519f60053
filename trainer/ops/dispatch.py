"""Choosing between a Triton kernel and the pure-PyTorch reference of an op."""

import importlib
import importlib.util

import torch

from csrc_triton._common import KernelCompileError  # imports torch only, never triton
from trainer.errors import TrainerError

FORCE_CHOICES = (None, "triton", "reference")


def _triton_installed() -> bool:
    # Only looks for the package: importing triton here would slow every `import trainer.ops`
    # down, and a finder that refuses it (an unsupported platform, a test) must not break the import.
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


HAS_TRITON = _triton_installed()


def use_triton(force: str | None, x: torch.Tensor) -> bool:
    """True when the op should run its Triton kernel.

    force=None dispatches on the device: CUDA tensors take the kernel, everything else the
    reference. force="triton" insists (tests use it with TRITON_INTERPRET=1 on CPU).
    """
    if force not in FORCE_CHOICES:
        raise ValueError(f"force must be one of 'triton', 'reference' or None, got {force!r}")
    if force == "reference":
        return False
    if force == "triton":
        if not HAS_TRITON:
            raise RuntimeError("force='triton' but triton is not installed (pip install triton, Linux only)")
        return True
    return HAS_TRITON and x.is_cuda


class KernelError(TrainerError):
    """A Triton kernel cannot be compiled for the problem and GPU it was asked for."""


def run_kernel(module: str, name: str, *args, **kwargs):
    """csrc_triton.<module>.<name>(*args, **kwargs), imported when first wanted (triton is Linux-only).

    A kernel that cannot be compiled for this shape and GPU raises KernelError, a TrainerError, so
    that the command line prints its one line (kernel, shape, architecture) instead of a traceback.
    """
    fn = getattr(importlib.import_module(f"csrc_triton.{module}"), name)
    try:
        return fn(*args, **kwargs)
    except KernelCompileError as error:
        raise KernelError(str(error)) from None
