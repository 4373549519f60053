"""SwiGLU gate, silu(gate) * up, and its backward.

The backward recomputes sigmoid(gate) from the saved inputs instead of reading a saved activation:
one fewer (tokens x intermediate) tensor kept alive between forward and backward. Math in fp32.
Tensors are handled as (rows, cols) with a row stride, so gate and up may be the two halves of one
fused gate_up projection without a copy.
"""

import torch
import triton
import triton.language as tl

from csrc_triton._common import as_rows, launch

BLOCK = 1024


@triton.jit
def _swiglu_fwd_kernel(G, U, OUT, stride_g, stride_u, stride_o, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    tl.store(OUT + row * stride_o + cols, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DO, G, U, DG, DU, stride_do, stride_g, stride_u, stride_dg, stride_du, n_cols, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    do = tl.load(DO + row * stride_do + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    # d silu / dg = sig * (1 + g * (1 - sig)) = sig + silu * (1 - sig)
    dg = do * u * (sig + silu * (1.0 - sig))
    du = do * silu
    tl.store(DG + row * stride_dg + cols, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * stride_du + cols, du.to(DU.dtype.element_ty), mask=mask)


def launch_config(n_cols: int) -> dict:
    """BLOCK and num_warps of both kernels (csrc_triton.compile_check compiles the same choice)."""
    return dict(BLOCK=min(BLOCK, triton.next_power_of_2(n_cols)), num_warps=4)


def _grid(n_rows: int, n_cols: int, block: int):
    # Rows on the first grid axis: it allows 2^31 - 1 programs, the second only 65535.
    return (n_rows, triton.cdiv(n_cols, block))


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for same-shaped tensors (trainer.ops.swiglu checks the shapes); returns a
    contiguous tensor of that shape."""
    g, u = as_rows(gate), as_rows(up)
    n_rows, n_cols = g.shape
    out = torch.empty((n_rows, n_cols), dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    if out.numel():
        config = launch_config(n_cols)
        launch(
            _swiglu_fwd_kernel,
            _grid(n_rows, n_cols, config["BLOCK"]),
            (g, u, out, g.stride(0), u.stride(0), out.stride(0), n_cols),
            config,
            f"rows={n_rows} cols={n_cols} {gate.dtype}",
        )
    return out.view(gate.shape)


def swiglu_backward(grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    """Returns (d gate, d up) in the dtypes of gate and up (grad_out, gate and up of one shape)."""
    do, g, u = as_rows(grad_out), as_rows(gate), as_rows(up)
    n_rows, n_cols = g.shape
    dg = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    du = torch.empty((n_rows, n_cols), dtype=up.dtype, device=up.device)
    if dg.numel():
        config = launch_config(n_cols)
        launch(
            _swiglu_bwd_kernel,
            _grid(n_rows, n_cols, config["BLOCK"]),
            (do, g, u, dg, du, do.stride(0), g.stride(0), u.stride(0), dg.stride(0), du.stride(0), n_cols),
            config,
            f"rows={n_rows} cols={n_cols} {gate.dtype}",
        )
    return dg.view(gate.shape), du.view(up.shape)
