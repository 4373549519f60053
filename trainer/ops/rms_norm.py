"""RMSNorm and the fused residual-add + RMSNorm that every Llama block runs back to back.

Both public functions go through one custom op, `trainer::rms_norm` (residual optional), so that
torch.compile sees an opaque node with a fake (shape-only) implementation instead of breaking its
graph on a Triton launch. Its backward is a second custom op. Each op body runs either the Triton
kernels or the pure-PyTorch reference, as the caller's dispatch decided.

The families differ in two places, both parameters here: `offset` is added to the weight (Gemma's
x_normed * (1 + weight)), and `cast` (NormCast) says where the result is rounded to the input's dtype.
"""

from enum import Enum
from typing import Optional

import torch
from torch import Tensor

from csrc_triton._common import as_rows  # imports torch only, never triton
from trainer.ops.dispatch import Impl, kernel_errors, use_triton


class NormCast(str, Enum):
    """Where RMSNorm meets the input's dtype (statistics are fp32 in both).

    LLAMA: the normalised value is cast to the input's dtype before the weight multiplies it; the
    output has promote(input, weight) dtype (LlamaRMSNorm; also Mistral, Qwen2/3, Phi-3).
    GEMMA: the weight (plus offset) multiplies the fp32 normalised value and only the output is cast,
    to the input's dtype (Gemma2RMSNorm / Gemma3RMSNorm; Olmo2RMSNorm is this order with offset 0).
    """

    LLAMA = "llama"
    GEMMA = "gemma"


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 for fp32 / bf16 / fp16 inputs; fp64 inputs keep fp64 so the reference stays an exact check.
    return torch.promote_types(dtype, torch.float32)


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0, cast: NormCast | str = NormCast.LLAMA
) -> torch.Tensor:
    # Statistics in fp32 whatever the input dtype, then the order of the family's Hugging Face
    # module (NormCast), so our model and theirs round identically.
    acc = _stats_dtype(x.dtype)
    xf = x.to(acc)
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if NormCast(cast) is NormCast.GEMMA:
        return (normed * (weight.to(acc) + offset)).to(x.dtype)
    if offset == 0:
        return weight * normed.to(x.dtype)
    # The offset is added in fp32 (as Gemma's 1.0 + weight.float()), then the product is rounded once.
    return ((weight.to(acc) + offset) * normed.to(x.dtype)).to(torch.promote_types(x.dtype, weight.dtype))


def _rstd_reference(x: Tensor, eps: float) -> Tensor:
    xf = x.to(_stats_dtype(x.dtype))
    return torch.rsqrt(xf.pow(2).mean(-1) + eps)


def _rms_norm_backward_reference(
    dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, dsum: Optional[Tensor], offset: float, cast: NormCast
):
    acc = _stats_dtype(x.dtype)
    n = x.to(acc) * rstd.to(acc).unsqueeze(-1)
    g = dy.to(acc) * (weight.to(acc) + offset)
    dx = rstd.to(acc).unsqueeze(-1) * (g - n * (g * n).mean(-1, keepdim=True))
    if dsum is not None:
        dx = dx + dsum.to(acc)
    # The weight's gradient sees what the forward multiplied it by: n rounded to x's dtype (LLAMA)
    # or n in fp32 (GEMMA). The offset is a constant: d(weight + offset) / d weight = 1.
    n_seen = n.to(x.dtype).to(acc) if cast is NormCast.LLAMA else n
    dw = (dy.to(acc) * n_seen).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype), dw.to(weight.dtype)


def _out_dtypes(x: Tensor, weight: Tensor, residual: Optional[Tensor], cast: NormCast, triton: bool):
    sum_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    rstd_dtype = torch.float32 if triton else _stats_dtype(sum_dtype)
    y_dtype = torch.promote_types(sum_dtype, weight.dtype) if cast is NormCast.LLAMA else sum_dtype
    return sum_dtype, y_dtype, rstd_dtype


@torch.library.custom_op("trainer::rms_norm", mutates_args=())
def _rms_norm_op(
    x: Tensor, weight: Tensor, residual: Optional[Tensor], eps: float, offset: float, cast: str, triton: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (x + residual, or an empty tensor without a residual; normed; rstd)."""
    cast = NormCast(cast)
    if residual is not None and residual.shape != x.shape:
        x, residual = torch.broadcast_tensors(x, residual)
    if triton:
        from csrc_triton.rms_norm import rms_norm_forward

        with kernel_errors():
            y, total, rstd = rms_norm_forward(
                as_rows(x),
                weight,
                eps,
                None if residual is None else as_rows(residual),
                offset=offset,
                round_normed=cast is NormCast.LLAMA,
            )
        total = x.new_empty(0) if total is None else total.view(x.shape)
        return total, y.view(x.shape), rstd.view(x.shape[:-1])
    total = x if residual is None else x + residual
    y = rms_norm_reference(total, weight, eps, offset, cast)
    return (x.new_empty(0) if residual is None else total), y, _rstd_reference(total, eps)


@_rms_norm_op.register_fake
def _(x, weight, residual, eps, offset, cast, triton):
    shape = x.shape if residual is None else torch.broadcast_shapes(x.shape, residual.shape)
    sum_dtype, y_dtype, rstd_dtype = _out_dtypes(x, weight, residual, NormCast(cast), triton)
    total = x.new_empty(0) if residual is None else x.new_empty(shape, dtype=sum_dtype)
    return total, x.new_empty(shape, dtype=y_dtype), x.new_empty(shape[:-1], dtype=rstd_dtype)


@torch.library.custom_op("trainer::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    rstd: Tensor,
    dsum: Optional[Tensor],
    offset: float,
    cast: str,
    triton: bool,
) -> tuple[Tensor, Tensor]:
    """(dx, dweight) given what was normalised (x, or the stored sum) and the gradient dsum that
    reached the stored sum directly."""
    cast = NormCast(cast)
    if triton:
        from csrc_triton.rms_norm import rms_norm_backward

        with kernel_errors():
            dx, dw = rms_norm_backward(
                as_rows(dy),
                as_rows(x),
                weight,
                rstd.reshape(-1),
                None if dsum is None else as_rows(dsum),
                offset=offset,
                round_normed=cast is NormCast.LLAMA,
            )
        return dx.view(x.shape), dw.to(weight.dtype)
    return _rms_norm_backward_reference(dy, x, weight, rstd, dsum, offset, cast)


@_rms_norm_backward_op.register_fake
def _(dy, x, weight, rstd, dsum, offset, cast, triton):
    return torch.empty_like(x), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, residual, eps, offset, cast, triton = inputs
    total, y, rstd = output
    ctx.save_for_backward(x if residual is None else total, weight, rstd)
    ctx.has_residual = residual is not None
    ctx.offset = offset
    ctx.cast = cast
    ctx.triton = triton
    ctx.x_dtype = x.dtype
    ctx.residual_dtype = None if residual is None else residual.dtype
    ctx.y_dtype = y.dtype
    ctx.mark_non_differentiable(rstd)
    ctx.set_materialize_grads(False)


def _backward(ctx, d_total, dy, _d_rstd):
    normed_input, weight, rstd = ctx.saved_tensors
    if dy is None:  # only the sum was used downstream
        dy = torch.zeros(normed_input.shape, dtype=ctx.y_dtype, device=normed_input.device)
    dsum, dw = _rms_norm_backward_op(
        dy, normed_input, weight, rstd, d_total if ctx.has_residual else None, ctx.offset, ctx.cast, ctx.triton
    )
    dx = dsum.to(ctx.x_dtype)
    # x and residual receive the same gradient; with equal dtypes it is the same tensor, as
    # autograd itself does for a + b.
    d_residual = dsum.to(ctx.residual_dtype) if ctx.has_residual else None
    return dx, dw, d_residual, None, None, None, None


_rms_norm_op.register_autograd(_backward, setup_context=_setup_context)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    offset: float = 0.0,
    cast: NormCast | str = NormCast.LLAMA,
    force: Impl = Impl.AUTO,
) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * (weight + offset) over the last dimension, rounded as `cast` says.

    Llama: rms_norm(x, w, eps); Gemma 2/3: rms_norm(x, w, eps, offset=1.0, cast="gemma");
    OLMo 2: rms_norm(x, w, eps, cast="gemma").
    """
    cast = NormCast(cast)
    return _rms_norm_op(x, weight, None, eps, float(offset), cast.value, use_triton(force, x))[1]


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    offset: float = 0.0,
    cast: NormCast | str = NormCast.LLAMA,
    force: Impl = Impl.AUTO,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (x + residual, rms_norm(x + residual)) with rms_norm's offset and cast."""
    cast = NormCast(cast)
    total, y, _ = _rms_norm_op(x, weight, residual, eps, float(offset), cast.value, use_triton(force, x))
    return total, y
