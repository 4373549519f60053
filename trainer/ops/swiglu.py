"""SwiGLU gate of the Llama MLP: silu(gate) * up."""

import torch
import torch.nn.functional as F


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, force: str | None = None) -> torch.Tensor:
    return swiglu_reference(gate, up)
