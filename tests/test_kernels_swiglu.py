"""SwiGLU: the Triton kernels (through the interpreter on CPU) and the reference path, against a
float64 oracle computed from the same inputs."""

import pytest
import torch
import torch.nn.functional as F

import trainer.ops as ops
from trainer.ops.testing import kernel_test_device, poisoned_allocations, rel_err

try:
    from csrc_triton import swiglu as kernels
except ImportError:  # no triton (macOS, Windows): the reference-path tests still run
    kernels = None
needs_triton = pytest.mark.skipif(kernels is None, reason="triton is not installed")

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEVICE = kernel_test_device()  # CPU through the interpreter, or CUDA when triton compiles for it


def oracle(gate, up, grad_out):
    g = gate.detach().double().requires_grad_()
    u = up.detach().double().requires_grad_()
    out = F.silu(g) * u
    dg, du = torch.autograd.grad(out, (g, u), grad_out.double())
    return out.detach(), dg, du


def make(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple((2 * torch.randn(shape, generator=gen)).to(dtype).to(DEVICE) for _ in range(3))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5, 257), (4, 256), (2, 1500)])  # the last spans 2 column blocks
def test_kernel_forward_backward(dtype, shape):
    gate, up, grad_out = make(shape, dtype)
    with poisoned_allocations():
        out = kernels.swiglu_forward(gate, up)
        dg, du = kernels.swiglu_backward(grad_out, gate, up)
    ref_out, ref_dg, ref_du = oracle(gate, up, grad_out)
    tol = TOL[dtype]
    assert out.shape == gate.shape and out.dtype == dtype
    assert rel_err(out, ref_out) <= tol and rel_err(dg, ref_dg) <= tol and rel_err(du, ref_du) <= tol


@needs_triton
def test_kernel_halves_of_a_fused_projection():
    # gate and up as the two halves of one gate_up output: strided rows, read without a copy.
    gate_up = torch.randn(2, 3, 2 * 130, device=DEVICE)
    gate, up = gate_up.chunk(2, dim=-1)
    assert kernels.as_rows(gate).data_ptr() == gate.data_ptr()
    grad_out = torch.randn(2, 3, 130, device=DEVICE)
    with poisoned_allocations():
        out = kernels.swiglu_forward(gate, up)
        dg, du = kernels.swiglu_backward(grad_out, gate, up)
    ref_out, ref_dg, ref_du = oracle(gate, up, grad_out)
    assert rel_err(out, ref_out) <= 1e-5 and rel_err(dg, ref_dg) <= 1e-5 and rel_err(du, ref_du) <= 1e-5


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_op_triton_autograd(dtype):
    gate, up, grad_out = make((2, 7, 45), dtype, seed=1)
    gate.requires_grad_()
    up.requires_grad_()
    with poisoned_allocations():
        out = ops.swiglu(gate, up, force="triton")
        dg, du = torch.autograd.grad(out, (gate, up), grad_out)
    ref_out, ref_dg, ref_du = oracle(gate, up, grad_out)
    tol = TOL[dtype]
    assert rel_err(out, ref_out) <= tol and rel_err(dg, ref_dg) <= tol and rel_err(du, ref_du) <= tol


def test_reference_fp64_matches_oracle():
    gate, up, grad_out = make((3, 4, 33), torch.float64, seed=2)
    gate.requires_grad_()
    up.requires_grad_()
    out = ops.swiglu(gate, up, force="reference")
    dg, du = torch.autograd.grad(out, (gate, up), grad_out)
    ref_out, ref_dg, ref_du = oracle(gate, up, grad_out)
    assert rel_err(out, ref_out) <= 1e-12 and rel_err(dg, ref_dg) <= 1e-12 and rel_err(du, ref_du) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_low_precision(dtype):
    gate, up, grad_out = make((5, 64), dtype, seed=3)
    gate.requires_grad_()
    up.requires_grad_()
    out = ops.swiglu(gate, up, force="reference")
    dg, du = torch.autograd.grad(out, (gate, up), grad_out)
    ref_out, ref_dg, ref_du = oracle(gate, up, grad_out)
    tol = TOL[dtype]
    assert rel_err(out, ref_out) <= tol and rel_err(dg, ref_dg) <= tol and rel_err(du, ref_du) <= tol
