"""Which implementation of each op runs: its Triton kernel or its pure-PyTorch reference.

The choice has one representation from the config to the op. `KernelChoice.from_config` turns the
[kernels] section into a frozen `KernelChoice`, one `Impl` per op; the model hands each op its
`Impl` as `force`; the op asks `use_triton(force, x)` and, for the kernel, calls its launcher in
csrc_triton directly (imported where it is called: triton is Linux-only) inside `kernel_errors()`,
which turns a kernel that cannot be compiled into one line instead of a traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
from enum import Enum

import torch

from csrc_triton._common import KernelCompileError  # imports torch only, never triton
from trainer.errors import TrainerError


class Impl(str, Enum):
    """How one op runs. AUTO: the Triton kernel for CUDA tensors when triton is installed, the
    reference otherwise; TRITON insists (tests use it on CPU with TRITON_INTERPRET=1)."""

    AUTO = "auto"
    TRITON = "triton"
    REFERENCE = "reference"


def _triton_installed() -> bool:
    # Only looks for the package: importing triton here would slow every `import trainer.ops`
    # down, and a finder that refuses it (an unsupported platform, a test) must not break the import.
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


HAS_TRITON = _triton_installed()


def use_triton(force: Impl | str, x: torch.Tensor) -> bool:
    """True when an op asked to run as `force` ("auto", "triton" or "reference") on `x` runs its kernel."""
    impl = Impl(force)
    if impl is Impl.REFERENCE:
        return False
    if impl is Impl.TRITON:
        if not HAS_TRITON:
            raise RuntimeError("force='triton' but triton is not installed (pip install triton, Linux only)")
        return True
    return HAS_TRITON and x.is_cuda


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    """How the model runs each op. `materialize_logits=True` computes the full logits and
    F.cross_entropy (the plain eager reference; [kernels] fused_ce=false) instead of the fused loss,
    whose implementation `fused_ce` chooses. `ce_chunk_bytes` > 0 caps the bytes the fused loss's
    logit chunks take at once (linear_cross_entropy's chunk_bytes): the memory the planner predicts
    is left for them, set once when the run is built (trainer/build.py); 0 sizes them from the shape."""

    rms_norm: Impl = Impl.AUTO
    rope: Impl = Impl.AUTO
    swiglu: Impl = Impl.AUTO
    fused_ce: Impl = Impl.AUTO
    materialize_logits: bool = False
    ce_chunk_bytes: int = 0

    @classmethod
    def everywhere(cls, impl: Impl | str) -> KernelChoice:
        """Every op as `impl`, with the fused loss."""
        impl = Impl(impl)
        return cls(impl, impl, impl, impl)

    @classmethod
    def eager(cls) -> KernelChoice:
        """The eager PyTorch reference of every op, logits materialised."""
        return cls(Impl.REFERENCE, Impl.REFERENCE, Impl.REFERENCE, Impl.REFERENCE, materialize_logits=True)

    @classmethod
    def from_config(cls, kernels) -> KernelChoice:
        """The [kernels] section (trainer.config.KernelConfig): enabled=false is the eager reference;
        a switched-off kernel runs its reference; fused_ce=false materialises the logits."""
        if not kernels.enabled:
            return cls.eager()

        def impl(on: bool) -> Impl:
            return Impl.AUTO if on else Impl.REFERENCE

        return cls(
            rms_norm=impl(kernels.rms_norm),
            rope=impl(kernels.rope),
            swiglu=impl(kernels.swiglu),
            materialize_logits=not kernels.fused_ce,
        )


class KernelError(TrainerError):
    """A Triton kernel cannot be compiled for the problem and GPU it was asked for."""


@contextlib.contextmanager
def kernel_errors():
    """Around a launcher call: a kernel that cannot be compiled for this shape and GPU raises
    KernelError, a TrainerError, so the command line prints its one line (kernel, shape, GPU)."""
    try:
        yield
    except KernelCompileError as error:
        raise KernelError(str(error)) from None
