"""Where a run computes: its device, compute dtype and autocast, and how its memory is measured."""

from __future__ import annotations

import contextlib
import resource
import warnings

import torch

from trainer.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available; use train.device=auto or cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """train.dtype -> the compute dtype; bf16 on a GPU without it falls back to fp16 (with a loss scaler)."""
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if name == "auto":
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if name == "bf16" and device.type == "cuda" and not cuda_bf16:
        warnings.warn(
            f"{torch.cuda.get_device_name(device)} has no bf16: computing in fp16 with a loss scaler "
            "instead (set train.dtype=fp16 or fp32 to choose)",
            stacklevel=2,
        )
        return torch.float16
    return DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for `dtype` on `device`; nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def peak_memory_bytes(device: torch.device) -> int:
    """The CUDA allocator's peak on a GPU; on CPU the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def parameter_count(params) -> int:
    """How many weights `params` hold. A bitsandbytes 4-bit weight packs two into a byte of a flat
    uint8 tensor: its quant_state keeps the shape it stands for, which is what counts."""
    total = 0
    for p in params:
        quant_state = getattr(p, "quant_state", None)
        total += quant_state.shape.numel() if quant_state is not None else p.numel()
    return total


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct tensors among `tensors` (None skipped)."""
    seen, total = set(), 0
    for t in tensors:
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
