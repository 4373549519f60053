"""Choosing between a Triton kernel and the pure-PyTorch reference of an op."""

import importlib.util

import torch

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
