"""RMSNorm and residual-add + RMSNorm, in Llama's form and Gemma's (offset 1 on the weight, fp32 up to
the output): Triton kernels (through the interpreter on CPU) and the reference path, against a
float64 oracle computed from the same inputs, and against each family's rounding order restated in
fp32 from transformers' LlamaRMSNorm / Gemma2RMSNorm."""

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
# (cast, offset): Llama's RMSNorm, and Gemma's x_normed * (1 + weight) kept in fp32 until the output.
VARIANTS = [("llama", 0.0), ("gemma", 1.0)]
VARIANT_IDS = ["llama", "gemma"]
DEVICE = kernel_test_device()  # CPU through the interpreter, or CUDA when triton compiles for it


def oracle(x, weight, residual=None, dy=None, d_total=None, eps=EPS, offset=0.0):
    """fp64 (total, y) and, given upstream gradients, (dx, dw, dresidual). In fp64 both casting
    orders are the same function: y = total / rms(total) * (weight + offset)."""
    xd = x.detach().double().requires_grad_()
    wd = weight.detach().double().requires_grad_()
    rd = None if residual is None else residual.detach().double().requires_grad_()
    total = xd if rd is None else xd + rd
    y = total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + eps) * (wd + offset)
    if dy is None:
        return total.detach(), y.detach()
    outs, grads = [y], [dy.double()]
    if d_total is not None:
        outs.append(total)
        grads.append(d_total.double())
    inputs = (xd, wd) if rd is None else (xd, wd, rd)
    return total.detach(), y.detach(), torch.autograd.grad(outs, inputs, grads)


def make(shape, dtype, seed=0, offset=0.0):
    """x, residual, weight, dy, d_sum; the weight is stored minus the offset (Gemma keeps w near 0
    and multiplies by 1 + w), so the effective scale is near 1 either way."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    r = torch.randn(shape, generator=g).to(dtype)
    w = (1 - offset + 0.2 * torch.randn(shape[-1], generator=g)).to(dtype)
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
@pytest.mark.parametrize("cast,offset", VARIANTS, ids=VARIANT_IDS)
def test_kernel_forward_backward(dtype, rows, cols, max_block, with_residual, cast, offset):
    x, r, w, dy, ds = make((rows, cols), dtype, offset=offset)
    res = r if with_residual else None
    variant = dict(offset=offset, round_normed=cast == "llama", max_block=max_block)
    with poisoned_allocations():
        y, total, rstd = kernels.rms_norm_forward(x, w, EPS, res, **variant)
        normed_input = total if with_residual else x
        dx, dw = kernels.rms_norm_backward(dy, normed_input, w, rstd, ds if with_residual else None, **variant)
    ref_total, ref_y, ref_grads = oracle(x, w, res, dy, ds if with_residual else None, offset=offset)
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
@pytest.mark.parametrize("cast,offset", VARIANTS, ids=VARIANT_IDS)
def test_kernel_wide_rows(cols, cast, offset):
    x, r, w, dy, ds = make((2, cols), torch.float32, offset=offset)
    variant = dict(offset=offset, round_normed=cast == "llama")
    with poisoned_allocations():
        y, total, rstd = kernels.rms_norm_forward(x, w, EPS, r, **variant)
        dx, dw = kernels.rms_norm_backward(dy, total, w, rstd, ds, **variant)
    _, ref_y, (ref_dx, ref_dw, _) = oracle(x, w, r, dy, ds, offset=offset)
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
@pytest.mark.parametrize("shape", [(2, 3, 5, 67), (3, 7, 37)])
@pytest.mark.parametrize("cast,offset", VARIANTS, ids=VARIANT_IDS)
def test_op_triton_autograd_any_leading_shape(dtype, shape, cast, offset):
    x, r, w, dy, ds = make(shape, dtype, seed=1, offset=offset)
    x.requires_grad_()
    r.requires_grad_()
    w.requires_grad_()
    variant = dict(offset=offset, cast=cast)
    with poisoned_allocations():
        total, y = ops.add_rms_norm(x, r, w, EPS, **variant, force="triton")
        gx, gw, gr = torch.autograd.grad((y, total), (x, w, r), (dy, ds))
    ref_total, ref_y, (ref_gx, ref_gw, ref_gr) = oracle(x, w, r, dy, ds, offset=offset)
    tol = TOL[dtype]
    assert rel_err(total, ref_total) <= tol and rel_err(y, ref_y) <= tol
    assert rel_err(gx, ref_gx) <= tol and rel_err(gr, ref_gr) <= tol and rel_err(gw, ref_gw) <= tol
    assert gw.dtype == dtype

    with poisoned_allocations():
        y = ops.rms_norm(x, w, EPS, **variant, force="triton")
        gx, gw = torch.autograd.grad(y, (x, w), dy)
    _, ref_y, (ref_gx, ref_gw) = oracle(x, w, None, dy, offset=offset)
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
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_op_gemma_output_keeps_the_input_dtype(impl):
    # Gemma2RMSNorm ends in output.type_as(x): bf16 activations with an fp32 weight give bf16.
    x, _, w, dy, _ = make((6, 96), torch.bfloat16, seed=2, offset=1.0)
    w = w.float().requires_grad_()
    x.requires_grad_()
    y = ops.rms_norm(x, w, EPS, offset=1.0, cast="gemma", force=impl)
    assert y.dtype == torch.bfloat16
    gx, gw = torch.autograd.grad(y, (x, w), dy)
    assert gx.dtype == torch.bfloat16 and gw.dtype == torch.float32
    _, ref_y, (ref_gx, ref_gw) = oracle(x, w, None, dy, offset=1.0)
    assert rel_err(y, ref_y) <= 2e-2 and rel_err(gx, ref_gx) <= 2e-2 and rel_err(gw, ref_gw) <= 2e-2


def family_order(x, weight, dy, offset, cast):
    """y and d weight in the family's rounding order, restated in fp32 from transformers'
    LlamaRMSNorm (weight * normed.to(input_dtype)) and Gemma2RMSNorm ((normed * (1 + weight.float())).type_as(x))."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)
    if cast == "llama":
        normed = normed.to(x.dtype).float()
    y = (normed * (weight.float() + offset)).to(x.dtype)
    dw = (dy.float() * normed).reshape(-1, x.shape[-1]).sum(0)
    return y, dw


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cast,offset", VARIANTS, ids=VARIANT_IDS)
def test_rounding_order_is_the_familys(impl, dtype, cast, offset):
    # In fp64 both orders agree, so the oracle cannot tell them apart; rounded to bf16/fp16 they
    # differ by an ulp in a quarter of the elements. The op must match its family's order.
    if impl == "triton" and kernels is None:
        pytest.skip("triton is not installed")
    if impl == "triton" and dtype == torch.bfloat16 and DEVICE.type == "cpu":
        pytest.skip("the interpreter converts fp32 to bf16 by truncation; a GPU rounds to nearest")
    x, _, w, dy, _ = make((16, 256), dtype, seed=7, offset=offset)
    other = "gemma" if cast == "llama" else "llama"
    want_y, want_dw = family_order(x, w, dy, offset, cast)
    other_y, other_dw = family_order(x, w, dy, offset, other)
    y = ops.rms_norm(x, w, EPS, offset=offset, cast=cast, force=impl)
    # The same roundings: equal but for the odd element where rsqrt's last bit differs.
    assert (y != want_y).float().mean() <= 0.01 and (y != other_y).float().mean() >= 0.1
    # d weight, from an fp32 weight so that its own rounding does not hide the difference.
    w32 = w.float().requires_grad_()
    y32 = ops.rms_norm(x, w32, EPS, offset=offset, cast=cast, force=impl)
    (dw,) = torch.autograd.grad(y32, (w32,), dy.to(y32.dtype))
    assert rel_err(dw, want_dw) <= 1e-5 < rel_err(dw, other_dw)


def test_cast_is_validated():
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="'olmo' is not a valid NormCast"):
        ops.rms_norm(x, torch.ones(4), cast="olmo")


@needs_triton
def test_op_only_sum_used_downstream():
    x, r, w, _, ds = make((4, 33), torch.float32, seed=3)
    x.requires_grad_()
    total, _ = ops.add_rms_norm(x, r, w, EPS, force="triton")
    (gx,) = torch.autograd.grad(total, (x,), ds)
    assert torch.equal(gx, ds)


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("cast,offset", VARIANTS, ids=VARIANT_IDS)
def test_reference_fp64_matches_oracle(with_residual, cast, offset):
    x, r, w, dy, ds = make((3, 4, 37), torch.float64, seed=4, offset=offset)
    for t in (x, r, w):
        t.requires_grad_()
    variant = dict(offset=offset, cast=cast)
    if with_residual:
        total, y = ops.add_rms_norm(x, r, w, EPS, **variant, force="reference")
        grads = torch.autograd.grad((y, total), (x, w, r), (dy, ds))
        ref_total, ref_y, ref_grads = oracle(x, w, r, dy, ds, offset=offset)
        assert rel_err(total, ref_total) <= 1e-12
    else:
        y = ops.rms_norm(x, w, EPS, **variant, force="reference")
        grads = torch.autograd.grad(y, (x, w), dy)
        _, ref_y, ref_grads = oracle(x, w, None, dy, offset=offset)
    assert rel_err(y, ref_y) <= 1e-12
    for g, ref in zip(grads, ref_grads, strict=True):
        assert rel_err(g, ref) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cast,offset", VARIANTS, ids=VARIANT_IDS)
def test_reference_low_precision(dtype, cast, offset):
    x, r, w, dy, ds = make((5, 61), dtype, seed=5, offset=offset)
    x.requires_grad_()
    w.requires_grad_()
    total, y = ops.add_rms_norm(x, r, w, EPS, offset=offset, cast=cast, force="reference")
    gx, gw = torch.autograd.grad((y, total), (x, w), (dy, ds))
    ref_total, ref_y, (ref_gx, ref_gw, _) = oracle(x, w, r, dy, ds, offset=offset)
    tol = TOL[dtype]
    assert rel_err(y, ref_y) <= tol and rel_err(gx, ref_gx) <= tol and rel_err(gw, ref_gw) <= tol
