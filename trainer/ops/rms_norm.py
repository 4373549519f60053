"""RMSNorm and the fused residual-add + RMSNorm that every Llama block runs back to back."""

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Statistics in fp32 whatever the input dtype, cast back before the weight: the order
    # Hugging Face Llama uses, so our model and theirs round identically.
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, force: str | None = None) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dimension."""
    return rms_norm_reference(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                 *, force: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (x + residual, rms_norm(x + residual))."""
    total = x + residual
    return total, rms_norm_reference(total, weight, eps)
