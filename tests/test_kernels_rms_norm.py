"""RMSNorm and residual-add + RMSNorm: Triton kernels (through the interpreter on CPU) and the
reference path, against a float64 oracle computed from the same inputs."""

import pytest
import torch

import trainer.ops as ops
from trainer.ops.testing import kernel_test_device, poisoned_allocations, rel_err

try:
    from csrc_triton import rms_norm as kernels
except ImportError:  # no triton (macOS, Windows): the reference-path tests still run
    kernels = None
needs_triton = pytest.mark.skipif(kernels is None, reason="triton is not installed")
ONE_BLOCK = 16384 if kernels is None else kernels.MAX_ONE_BLOCK

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = 1e-6
DEVICE = kernel_test_device()  # CPU through the interpreter, or CUDA when triton compiles for it


def oracle(x, weight, residual=None, dy=None, d_total=None, eps=EPS):
    """fp64 (total, y) and, given upstream gradients, (dx, dw, dresidual)."""
    xd = x.detach().double().requires_grad_()
    wd = weight.detach().double().requires_grad_()
    rd = None if residual is None else residual.detach().double().requires_grad_()
    total = xd if rd is None else xd + rd
    y = total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + eps) * wd
    if dy is None:
        return total.detach(), y.detach()
    outs, grads = [y], [dy.double()]
    if d_total is not None:
        outs.append(total)
        grads.append(d_total.double())
    inputs = (xd, wd) if rd is None else (xd, wd, rd)
    return total.detach(), y.detach(), torch.autograd.grad(outs, inputs, grads)


def make(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    r = torch.randn(shape, generator=g).to(dtype)
    w = (1 + 0.2 * torch.randn(shape[-1], generator=g)).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    ds = torch.randn(shape, generator=g).to(dtype)
    return tuple(t.to(DEVICE) for t in (x, r, w, dy, ds))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "rows,cols,max_block",
    [
        (1, 7, ONE_BLOCK),  # one row, prime width
        (13, 257, ONE_BLOCK),  # prime rows, width just past a power of two
        (8, 256, ONE_BLOCK),  # round
        (5, 300, 64),  # the streamed path for rows wider than one block
    ],
)
@pytest.mark.parametrize("with_residual", [False, True])
def test_kernel_forward_backward(dtype, rows, cols, max_block, with_residual):
    x, r, w, dy, ds = make((rows, cols), dtype)
    res = r if with_residual else None
    with poisoned_allocations():
        y, total, rstd = kernels.rms_norm_forward(x, w, EPS, res, max_block=max_block)
        normed_input = total if with_residual else x
        dx, dw = kernels.rms_norm_backward(
            dy, normed_input, w, rstd, ds if with_residual else None, max_block=max_block
        )
    ref_total, ref_y, ref_grads = oracle(x, w, res, dy, ds if with_residual else None)
    tol = TOL[dtype]
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == torch.float32
    assert rel_err(y, ref_y) <= tol
    if with_residual:
        assert total.dtype == dtype and rel_err(total, ref_total) <= tol
    assert rel_err(dx, ref_grads[0]) <= tol
    assert rel_err(dw, ref_grads[1]) <= tol
    assert torch.isfinite(rstd).all()


@needs_triton
# The widest row kept in registers, the next width (streamed in slices), and a prime past it.
@pytest.mark.parametrize("cols", [8192, 16384, 16411])
def test_kernel_wide_rows(cols):
    x, r, w, dy, ds = make((2, cols), torch.float32)
    with poisoned_allocations():
        y, total, rstd = kernels.rms_norm_forward(x, w, EPS, r)
        dx, dw = kernels.rms_norm_backward(dy, total, w, rstd, ds)
    _, ref_y, (ref_dx, ref_dw, _) = oracle(x, w, r, dy, ds)
    assert rel_err(y, ref_y) <= 1e-5
    assert rel_err(dx, ref_dx) <= 1e-5
    assert rel_err(dw, ref_dw) <= 1e-5


@needs_triton
def test_kernel_strided_rows_and_many_rows_per_program():
    # Rows that are slices of a wider buffer are read through their stride, without a copy; 37
    # rows over the interpreter's 4 programs make each program loop over several rows.
    base = torch.randn(37, 300, device=DEVICE)
    x = base[:, :130]
    w = torch.randn(130, device=DEVICE)
    dy = torch.randn(37, 130, device=DEVICE)
    with poisoned_allocations():
        y, _, rstd = kernels.rms_norm_forward(x, w, EPS)
        dx, dw = kernels.rms_norm_backward(dy, x, w, rstd)
    _, ref_y, (ref_dx, ref_dw) = oracle(x, w, None, dy)
    assert rel_err(y, ref_y) <= 1e-5
    assert rel_err(dx, ref_dx) <= 1e-5
    assert rel_err(dw, ref_dw) <= 1e-5


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_op_triton_autograd_any_leading_shape(dtype):
    x, r, w, dy, ds = make((2, 3, 5, 67), dtype, seed=1)
    x.requires_grad_()
    r.requires_grad_()
    w.requires_grad_()
    with poisoned_allocations():
        total, y = ops.add_rms_norm(x, r, w, EPS, force="triton")
        gx, gw, gr = torch.autograd.grad((y, total), (x, w, r), (dy, ds))
    ref_total, ref_y, (ref_gx, ref_gw, ref_gr) = oracle(x, w, r, dy, ds)
    tol = TOL[dtype]
    assert rel_err(total, ref_total) <= tol and rel_err(y, ref_y) <= tol
    assert rel_err(gx, ref_gx) <= tol and rel_err(gr, ref_gr) <= tol and rel_err(gw, ref_gw) <= tol
    assert gw.dtype == dtype

    with poisoned_allocations():
        y = ops.rms_norm(x, w, EPS, force="triton")
        gx, gw = torch.autograd.grad(y, (x, w), dy)
    _, ref_y, (ref_gx, ref_gw) = oracle(x, w, None, dy)
    assert rel_err(y, ref_y) <= tol and rel_err(gx, ref_gx) <= tol and rel_err(gw, ref_gw) <= tol


@needs_triton
def test_op_triton_mixed_precision_weight():
    # bf16 activations with an fp32 weight (fp32 parameters under autocast): the output promotes to
    # fp32 as in the reference, and the weight gradient comes back in fp32.
    x, _, w, dy, _ = make((6, 96), torch.bfloat16, seed=2)
    w = w.float().requires_grad_()
    x.requires_grad_()
    y = ops.rms_norm(x, w, EPS, force="triton")
    ref = ops.rms_norm(x, w, EPS, force="reference")
    assert y.dtype == ref.dtype == torch.float32
    gx, gw = torch.autograd.grad(y, (x, w), dy.float())
    assert gx.dtype == torch.bfloat16 and gw.dtype == torch.float32
    _, ref_y, (ref_gx, ref_gw) = oracle(x, w, None, dy)
    assert rel_err(y, ref_y) <= 2e-2 and rel_err(gx, ref_gx) <= 2e-2 and rel_err(gw, ref_gw) <= 2e-2


@needs_triton
def test_op_only_sum_used_downstream():
    x, r, w, _, ds = make((4, 33), torch.float32, seed=3)
    x.requires_grad_()
    total, _ = ops.add_rms_norm(x, r, w, EPS, force="triton")
    (gx,) = torch.autograd.grad(total, (x,), ds)
    assert torch.equal(gx, ds)


@pytest.mark.parametrize("with_residual", [False, True])
def test_reference_fp64_matches_oracle(with_residual):
    x, r, w, dy, ds = make((3, 4, 37), torch.float64, seed=4)
    for t in (x, r, w):
        t.requires_grad_()
    if with_residual:
        total, y = ops.add_rms_norm(x, r, w, EPS, force="reference")
        grads = torch.autograd.grad((y, total), (x, w, r), (dy, ds))
        ref_total, ref_y, ref_grads = oracle(x, w, r, dy, ds)
        assert rel_err(total, ref_total) <= 1e-12
    else:
        y = ops.rms_norm(x, w, EPS, force="reference")
        grads = torch.autograd.grad(y, (x, w), dy)
        _, ref_y, ref_grads = oracle(x, w, None, dy)
    assert rel_err(y, ref_y) <= 1e-12
    for g, ref in zip(grads, ref_grads, strict=True):
        assert rel_err(g, ref) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_low_precision(dtype):
    x, r, w, dy, ds = make((5, 61), dtype, seed=5)
    x.requires_grad_()
    w.requires_grad_()
    total, y = ops.add_rms_norm(x, r, w, EPS, force="reference")
    gx, gw = torch.autograd.grad((y, total), (x, w), (dy, ds))
    ref_total, ref_y, (ref_gx, ref_gw, _) = oracle(x, w, r, dy, ds)
    tol = TOL[dtype]
    assert rel_err(y, ref_y) <= tol and rel_err(gx, ref_gx) <= tol and rel_err(gw, ref_gw) <= tol
