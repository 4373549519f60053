"""Gated activations of the MLP, act(gate) * up, and their backward: SwiGLU (act = silu, Llama,
Qwen, Mistral, Phi-3, OLMo 2) and GeGLU (act = tanh-approximated GELU, Gemma), one kernel pair for
both, the activation a compile-time constant.

Both activations are x * sigmoid(z(x)): silu with z = x, and tanh-GELU because
0.5 * (1 + tanh(u)) = sigmoid(2u), so 0.5 x (1 + tanh(u)) = x * sigmoid(2u) with
u = sqrt(2/pi) * (x + 0.044715 x^3) (Hendrycks & Gimpel 2016, "Gaussian Error Linear Units", eq. for
the tanh approximation; the same constants as torch's F.gelu(approximate="tanh") and transformers'
gelu_pytorch_tanh). Their derivatives share the form too: sigmoid(z) + x sigmoid(z) (1 - sigmoid(z)) z'.

The backward recomputes sigmoid(z) from the saved inputs instead of reading a saved activation:
one fewer (tokens x intermediate) tensor kept alive between forward and backward. Math in fp32.
Tensors are handled as (rows, cols) with a row stride, so gate and up may be the two halves of one
fused gate_up projection without a copy.
"""

import torch
import triton
import triton.language as tl

from csrc_triton._common import as_rows, launch

BLOCK = 1024

# The ACTIVATION constexpr of both kernels.
SILU = 0
GELU_TANH = 1
ACTIVATIONS = (SILU, GELU_TANH)

# 2 * sqrt(2 / pi) and 0.044715: the tanh approximation of GELU (Hendrycks & Gimpel 2016), the
# factor 2 turning its tanh into a sigmoid.
_GELU_2K = tl.constexpr(1.5957691216057308)
_GELU_C = tl.constexpr(0.044715)


@triton.jit
def _sigmoid_arg(g, ACTIVATION: tl.constexpr):
    """(z, dz/dg) such that act(g) = g * sigmoid(z)."""
    if ACTIVATION == 1:
        z = _GELU_2K * (g + _GELU_C * g * g * g)
        dz = _GELU_2K * (1.0 + 3.0 * _GELU_C * g * g)
    else:
        z = g
        dz = tl.full(g.shape, 1.0, tl.float32)
    return z, dz


@triton.jit
def _swiglu_fwd_kernel(G, U, OUT, stride_g, stride_u, stride_o, n_cols, BLOCK: tl.constexpr, ACTIVATION: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    z, _ = _sigmoid_arg(g, ACTIVATION)
    out = g * tl.sigmoid(z) * u
    tl.store(OUT + row * stride_o + cols, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DO,
    G,
    U,
    DG,
    DU,
    stride_do,
    stride_g,
    stride_u,
    stride_dg,
    stride_du,
    n_cols,
    BLOCK: tl.constexpr,
    ACTIVATION: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    do = tl.load(DO + row * stride_do + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    z, dz = _sigmoid_arg(g, ACTIVATION)
    sig = tl.sigmoid(z)
    act = g * sig
    # d (g sigmoid(z)) / dg = sig + g sig (1 - sig) dz/dg = sig + act (1 - sig) dz/dg
    dg = do * u * (sig + act * (1.0 - sig) * dz)
    du = do * act
    tl.store(DG + row * stride_dg + cols, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * stride_du + cols, du.to(DU.dtype.element_ty), mask=mask)


def launch_config(n_cols: int, activation: int = SILU) -> dict:
    """BLOCK, ACTIVATION and num_warps of both kernels (csrc_triton.compile_check compiles the same choice)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS} (SILU, GELU_TANH), got {activation!r}")
    return dict(BLOCK=min(BLOCK, triton.next_power_of_2(n_cols)), ACTIVATION=activation, num_warps=4)


def _grid(n_rows: int, n_cols: int, block: int):
    # Rows on the first grid axis: it allows 2^31 - 1 programs, the second only 65535.
    return (n_rows, triton.cdiv(n_cols, block))


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor, activation: int = SILU) -> torch.Tensor:
    """act(gate) * up for same-shaped tensors (trainer.ops.swiglu checks the shapes), act silu
    (SILU) or tanh-GELU (GELU_TANH); returns a contiguous tensor of that shape."""
    g, u = as_rows(gate), as_rows(up)
    n_rows, n_cols = g.shape
    out = torch.empty((n_rows, n_cols), dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    if out.numel():
        config = launch_config(n_cols, activation)
        launch(
            _swiglu_fwd_kernel,
            _grid(n_rows, n_cols, config["BLOCK"]),
            (g, u, out, g.stride(0), u.stride(0), out.stride(0), n_cols),
            config,
            f"rows={n_rows} cols={n_cols} {gate.dtype}",
        )
    return out.view(gate.shape)


def swiglu_backward(grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: int = SILU):
    """Returns (d gate, d up) in the dtypes of gate and up (grad_out, gate and up of one shape)."""
    do, g, u = as_rows(grad_out), as_rows(gate), as_rows(up)
    n_rows, n_cols = g.shape
    dg = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    du = torch.empty((n_rows, n_cols), dtype=up.dtype, device=up.device)
    if dg.numel():
        config = launch_config(n_cols, activation)
        launch(
            _swiglu_bwd_kernel,
            _grid(n_rows, n_cols, config["BLOCK"]),
            (do, g, u, dg, du, do.stride(0), g.stride(0), u.stride(0), dg.stride(0), du.stride(0), n_cols),
            config,
            f"rows={n_rows} cols={n_cols} {gate.dtype}",
        )
    return dg.view(gate.shape), du.view(up.shape)
