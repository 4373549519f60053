"""SwiGLU gate of the Llama MLP: silu(gate) * up.

Goes through the custom ops `trainer::swiglu` / `trainer::swiglu_backward`. The backward recomputes
silu from the saved gate and up (no saved activation), in fp32.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.ops.dispatch import Impl, kernel_errors, use_triton


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _swiglu_backward_reference(grad_out: Tensor, gate: Tensor, up: Tensor):
    acc = torch.promote_types(gate.dtype, torch.float32)
    g, u, do = gate.to(acc), up.to(acc), grad_out.to(acc)
    # ATen's fused silu_backward computes d silu(g) = sigmoid(g) (1 + g (1 - sigmoid(g))) in one pass:
    # four passes over the (tokens x intermediate) tensors instead of eight, half the CPU time.
    d_gate = torch.ops.aten.silu_backward(do * u, g)
    return d_gate.to(gate.dtype), (do * F.silu(g)).to(up.dtype)


@torch.library.custom_op("trainer::swiglu", mutates_args=())
def _swiglu_op(gate: Tensor, up: Tensor, triton: bool) -> Tensor:
    if triton:
        from csrc_triton.swiglu import swiglu_forward

        with kernel_errors():
            return swiglu_forward(gate, up)
    return swiglu_reference(gate, up)


@_swiglu_op.register_fake
def _(gate, up, triton):
    shape = torch.broadcast_shapes(gate.shape, up.shape)
    return gate.new_empty(shape, dtype=torch.promote_types(gate.dtype, up.dtype))


@torch.library.custom_op("trainer::swiglu_backward", mutates_args=())
def _swiglu_backward_op(grad_out: Tensor, gate: Tensor, up: Tensor, triton: bool) -> tuple[Tensor, Tensor]:
    if triton:
        from csrc_triton.swiglu import swiglu_backward

        with kernel_errors():
            return swiglu_backward(grad_out, gate, up)
    return _swiglu_backward_reference(grad_out, gate, up)


@_swiglu_backward_op.register_fake
def _(grad_out, gate, up, triton):
    return torch.empty_like(gate), torch.empty_like(up)


def _setup_context(ctx, inputs, output):
    gate, up, triton = inputs
    ctx.save_for_backward(gate, up)
    ctx.triton = triton


def _backward(ctx, grad_out):
    gate, up = ctx.saved_tensors
    return (*_swiglu_backward_op(grad_out, gate, up, ctx.triton), None)


_swiglu_op.register_autograd(_backward, setup_context=_setup_context)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, force: Impl = Impl.AUTO) -> torch.Tensor:
    # Checked here for both paths: the reference would broadcast, the kernel read out of bounds.
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    return _swiglu_op(gate, up, use_triton(force, gate))
