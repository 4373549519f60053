"""Gated activation of the MLP: act(gate) * up, with act silu (SwiGLU: Llama, Qwen, Mistral, Phi-3,
OLMo 2) or tanh-approximated GELU (GeGLU: Gemma's gelu_pytorch_tanh).

Goes through the custom ops `trainer::gated_activation` / `trainer::gated_activation_backward`, the
activation an argument of both. The backward recomputes the activation from the saved gate and up
(no saved activation), in fp32.
"""

from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.ops.dispatch import Impl, kernel_errors, use_triton


class Activation(str, Enum):
    """The gate's activation. GELU_TANH is F.gelu(approximate="tanh"), transformers' gelu_pytorch_tanh."""

    SILU = "silu"
    GELU_TANH = "gelu_tanh"


def gated_activation_reference(gate: Tensor, up: Tensor, activation: Activation | str = Activation.SILU) -> Tensor:
    # In the inputs' dtype, as the Hugging Face MLPs compute act_fn(gate_proj(x)) * up_proj(x).
    if Activation(activation) is Activation.GELU_TANH:
        return F.gelu(gate, approximate="tanh") * up
    return F.silu(gate) * up


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return gated_activation_reference(gate, up, Activation.SILU)


def _backward_reference(grad_out: Tensor, gate: Tensor, up: Tensor, activation: Activation):
    acc = torch.promote_types(gate.dtype, torch.float32)
    g, u, do = gate.to(acc), up.to(acc), grad_out.to(acc)
    # ATen's fused silu_backward / gelu_backward compute d act(g) in one pass: four passes over the
    # (tokens x intermediate) tensors instead of eight, half the CPU time.
    if activation is Activation.GELU_TANH:
        d_gate = torch.ops.aten.gelu_backward(do * u, g, approximate="tanh")
        act = F.gelu(g, approximate="tanh")
    else:
        d_gate = torch.ops.aten.silu_backward(do * u, g)
        act = F.silu(g)
    return d_gate.to(gate.dtype), (do * act).to(up.dtype)


def _kernel_activation(activation: Activation) -> int:
    from csrc_triton.swiglu import GELU_TANH, SILU

    return {Activation.SILU: SILU, Activation.GELU_TANH: GELU_TANH}[activation]


@torch.library.custom_op("trainer::gated_activation", mutates_args=())
def _gated_op(gate: Tensor, up: Tensor, activation: str, triton: bool) -> Tensor:
    act = Activation(activation)
    if triton:
        from csrc_triton.swiglu import swiglu_forward

        with kernel_errors():
            return swiglu_forward(gate, up, _kernel_activation(act))
    return gated_activation_reference(gate, up, act)


@_gated_op.register_fake
def _(gate, up, activation, triton):
    shape = torch.broadcast_shapes(gate.shape, up.shape)
    return gate.new_empty(shape, dtype=torch.promote_types(gate.dtype, up.dtype))


@torch.library.custom_op("trainer::gated_activation_backward", mutates_args=())
def _gated_backward_op(
    grad_out: Tensor, gate: Tensor, up: Tensor, activation: str, triton: bool
) -> tuple[Tensor, Tensor]:
    act = Activation(activation)
    if triton:
        from csrc_triton.swiglu import swiglu_backward

        with kernel_errors():
            return swiglu_backward(grad_out, gate, up, _kernel_activation(act))
    return _backward_reference(grad_out, gate, up, act)


@_gated_backward_op.register_fake
def _(grad_out, gate, up, activation, triton):
    return torch.empty_like(gate), torch.empty_like(up)


def _setup_context(ctx, inputs, output):
    gate, up, activation, triton = inputs
    ctx.save_for_backward(gate, up)
    ctx.activation = activation
    ctx.triton = triton


def _backward(ctx, grad_out):
    gate, up = ctx.saved_tensors
    return (*_gated_backward_op(grad_out, gate, up, ctx.activation, ctx.triton), None, None)


_gated_op.register_autograd(_backward, setup_context=_setup_context)


def gated_activation(
    gate: torch.Tensor, up: torch.Tensor, activation: Activation | str = Activation.SILU, *, force: Impl = Impl.AUTO
) -> torch.Tensor:
    """act(gate) * up, act "silu" (SwiGLU) or "gelu_tanh" (GeGLU); gate and up of one shape."""
    # Validated here, before the custom op, so a wrong name is a ValueError at the call.
    activation = Activation(activation)
    # Checked here for both paths: the reference would broadcast, the kernel read out of bounds.
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    return _gated_op(gate, up, activation.value, use_triton(force, gate))


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, force: Impl = Impl.AUTO) -> torch.Tensor:
    """silu(gate) * up: gated_activation with "silu"."""
    return gated_activation(gate, up, Activation.SILU, force=force)
