"""Rotary position embedding, rotate-half convention (first half / second half of head_dim)."""

import torch


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _broadcastable(t: torch.Tensor) -> torch.Tensor:
    # (seq, dim) -> (1, 1, seq, dim); (batch, seq, dim) -> (batch, 1, seq, dim)
    return t[None, None] if t.dim() == 2 else t[:, None]


def rope_reference(q, k, cos, sin):
    cos, sin = _broadcastable(cos).to(q.dtype), _broadcastable(sin).to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         *, force: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q (batch, q_heads, seq, head_dim) and k (batch, kv_heads, seq, head_dim).

    cos and sin are (seq, head_dim) or (batch, seq, head_dim). Returns new tensors.
    """
    return rope_reference(q, k, cos, sin)
