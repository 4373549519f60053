"""Rotary position embedding, rotate-half convention (first half / second half of head_dim).

`rope` goes through the custom op `trainer::rope`, which rotates q and k together (one Triton
launch, or the PyTorch reference). Its backward is the same op with the inverse rotation. cos and
sin are position tables, not learned: they receive no gradient.
"""

import torch
from torch import Tensor

from trainer.ops.dispatch import Impl, kernel_errors, use_triton


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate_half_transposed(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((x[..., half:], -x[..., :half]), dim=-1)


def _broadcastable(t: torch.Tensor) -> torch.Tensor:
    # (seq, dim) -> (1, 1, seq, dim); (batch, seq, dim) -> (batch, 1, seq, dim)
    return t[None, None] if t.dim() == 2 else t[:, None]


def rope_reference(q, k, cos, sin):
    cos, sin = _broadcastable(cos).to(q.dtype), _broadcastable(sin).to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rope_inverse_reference(dq, dk, cos, sin):
    # The transpose of x -> x * cos + rotate_half(x) * sin, which is its inverse for a rotation table.
    cos, sin = _broadcastable(cos).to(dq.dtype), _broadcastable(sin).to(dq.dtype)
    return dq * cos + _rotate_half_transposed(dq * sin), dk * cos + _rotate_half_transposed(dk * sin)


@torch.library.custom_op("trainer::rope", mutates_args=())
def _rope_op(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, inverse: bool, triton: bool) -> tuple[Tensor, Tensor]:
    if triton:
        from csrc_triton.rope import rope_rotate

        with kernel_errors():
            return rope_rotate(q, k, cos, sin, inverse)
    if inverse:
        return _rope_inverse_reference(q, k, cos, sin)
    return rope_reference(q, k, cos, sin)


@_rope_op.register_fake
def _(q, k, cos, sin, inverse, triton):
    return torch.empty_like(q), torch.empty_like(k)


def _setup_context(ctx, inputs, output):
    q, k, cos, sin, inverse, triton = inputs
    ctx.save_for_backward(cos, sin)
    ctx.args = (inverse, triton)
    ctx.like = ((q.shape, q.dtype, q.device), (k.shape, k.dtype, k.device))
    ctx.set_materialize_grads(False)


def _backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    inverse, triton = ctx.args
    (q_shape, q_dtype, q_device), (k_shape, k_dtype, k_device) = ctx.like
    if dq is None:  # only k was used downstream
        dq = torch.zeros(q_shape, dtype=q_dtype, device=q_device)
    if dk is None:
        dk = torch.zeros(k_shape, dtype=k_dtype, device=k_device)
    dq, dk = _rope_op(dq, dk, cos, sin, not inverse, triton)
    return dq, dk, None, None, None, None


_rope_op.register_autograd(_backward, setup_context=_setup_context)


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, force: Impl = Impl.AUTO
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q (batch, q_heads, seq, head_dim) and k (batch, kv_heads, seq, head_dim).

    cos and sin are (seq, head_dim) or (batch, seq, head_dim). Returns new tensors.
    """
    return _rope_op(q, k, cos, sin, False, use_triton(force, q))
