"""grouped_mm: rows of x sorted by group, each group times its own weight (the experts of an MoE layer).

One op with its own backward, so torch.compile sees one opaque node with a shape-only fake kernel
instead of tracing into torch._grouped_mm (whose fake kernel accepts only bf16) or into the
fallback loop (which reads the group sizes on the host). Forward and the input's gradient are
grouped matmuls; the weight's gradient is torch._grouped_mm's other form, groups along the
contracted dimension: x[group]^T @ grad[group] for each group.

`grouped` picks torch._grouped_mm (where grouped_mm_supported says it runs) or the loop over the
groups' slices, the reference that fp64 checks and older torch use.
"""

from __future__ import annotations

import torch
from torch import Tensor


def grouped_mm_supported(x: Tensor, weight: Tensor) -> bool:
    """Whether torch._grouped_mm runs x @ weight[g] here: the installed torch has it, CPU in fp32 or
    bf16, CUDA in bf16 on compute capability 9.0 or newer, rows 16-byte aligned."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != weight.dtype:
        return False
    if x.device.type == "cuda":
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (9, 0):
            return False
    elif x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    align = 16 // x.element_size()
    return x.shape[-1] % align == 0 and weight.shape[-1] % align == 0


def _slices(ends: Tensor):
    start = 0
    for group, end in enumerate(ends.tolist()):
        yield group, start, end
        start = end


@torch.library.custom_op("trainer::grouped_mm", mutates_args=())
def _grouped_mm_op(x: Tensor, weight: Tensor, ends: Tensor, grouped: bool) -> Tensor:
    if grouped:
        return torch._grouped_mm(x, weight, offs=ends.to(torch.int32))
    out = x.new_zeros(x.shape[0], weight.shape[-1])
    for group, start, end in _slices(ends):
        if end > start:
            out[start:end] = x[start:end] @ weight[group]
    return out


@_grouped_mm_op.register_fake
def _(x, weight, ends, grouped):
    return x.new_empty(x.shape[0], weight.shape[-1])


@torch.library.custom_op("trainer::grouped_mm_weight_grad", mutates_args=())
def _weight_grad_op(x: Tensor, grad: Tensor, ends: Tensor, groups: int, grouped: bool) -> Tensor:
    if grouped:
        return torch._grouped_mm(x.t(), grad, offs=ends.to(torch.int32))
    out = x.new_zeros(groups, x.shape[1], grad.shape[1])
    for group, start, end in _slices(ends):
        if end > start:
            out[group] = x[start:end].t() @ grad[start:end]
    return out


@_weight_grad_op.register_fake
def _(x, grad, ends, groups, grouped):
    return x.new_empty(groups, x.shape[1], grad.shape[1])


def _setup_context(ctx, inputs, output):
    x, weight, ends, grouped = inputs
    ctx.save_for_backward(x, weight, ends)
    ctx.grouped = grouped


def _backward(ctx, grad):
    x, weight, ends = ctx.saved_tensors
    grad = grad.contiguous()
    dx = _grouped_mm_op(grad, weight.transpose(1, 2), ends, ctx.grouped) if ctx.needs_input_grad[0] else None
    dw = _weight_grad_op(x, grad, ends, weight.shape[0], ctx.grouped) if ctx.needs_input_grad[1] else None
    return dx, dw, None, None


_grouped_mm_op.register_autograd(_backward, setup_context=_setup_context)


def grouped_mm(x: Tensor, weight: Tensor, ends: Tensor, grouped: bool | None = None) -> Tensor:
    """(rows, out): group g's rows of x (ends[g-1]:ends[g], sorted by group) times weight[g];
    weight is (groups, in, out). grouped: None picks torch._grouped_mm where it runs."""
    if grouped is None:
        grouped = grouped_mm_supported(x, weight)
    return _grouped_mm_op(x, weight, ends, grouped)
