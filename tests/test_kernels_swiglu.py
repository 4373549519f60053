"""Gated activations, SwiGLU (silu) and GeGLU (tanh-GELU): the Triton kernels (through the
interpreter on CPU) and the reference path, against a float64 oracle computed from the same inputs."""

import math

import pytest
import torch

import trainer.ops as ops
from trainer.ops.testing import kernel_test_device, poisoned_allocations, rel_err

try:
    from csrc_triton import swiglu as kernels
except ImportError:  # no triton (macOS, Windows): the reference-path tests still run
    kernels = None
needs_triton = pytest.mark.skipif(kernels is None, reason="triton is not installed")

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ACTIVATIONS = ["silu", "gelu_tanh"]
DEVICE = kernel_test_device()  # CPU through the interpreter, or CUDA when triton compiles for it


def kernel_activation(name):
    return {"silu": kernels.SILU, "gelu_tanh": kernels.GELU_TANH}[name]


def act64(g, activation):
    """The activation written out in fp64, independently of the code under test."""
    if activation == "silu":
        return g / (1 + torch.exp(-g))
    # Hendrycks & Gimpel 2016: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    return 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))


def oracle(gate, up, grad_out, activation="silu"):
    g = gate.detach().double().requires_grad_()
    u = up.detach().double().requires_grad_()
    out = act64(g, activation) * u
    dg, du = torch.autograd.grad(out, (g, u), grad_out.double())
    return out.detach(), dg, du


def make(shape, dtype, seed=0, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    return tuple((scale * torch.randn(shape, generator=gen)).to(dtype).to(DEVICE) for _ in range(3))


def assert_close(got, ref, tol):
    for g, r in zip(got, ref, strict=True):
        assert not torch.isnan(g).any(), "an output element was never written (NaN poison) or is NaN"
        assert rel_err(g, r) <= tol


@needs_triton
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
# odd, round, and 1500 columns spanning two column blocks
@pytest.mark.parametrize("shape", [(1, 1), (3, 7, 37), (3, 5, 257), (4, 256), (2, 1500)])
def test_kernel_forward_backward(activation, dtype, shape):
    gate, up, grad_out = make(shape, dtype)
    with poisoned_allocations():
        out = kernels.swiglu_forward(gate, up, kernel_activation(activation))
        dg, du = kernels.swiglu_backward(grad_out, gate, up, kernel_activation(activation))
    assert out.shape == gate.shape and out.dtype == dtype
    assert dg.dtype == du.dtype == dtype
    assert_close((out, dg, du), oracle(gate, up, grad_out, activation), TOL[dtype])


@needs_triton
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_kernel_halves_of_a_fused_projection(activation):
    # gate and up as the two halves of one gate_up output: strided rows, read without a copy.
    gate_up = torch.randn(2, 3, 2 * 130, device=DEVICE)
    gate, up = gate_up.chunk(2, dim=-1)
    assert kernels.as_rows(gate).data_ptr() == gate.data_ptr()
    grad_out = torch.randn(2, 3, 130, device=DEVICE)
    with poisoned_allocations():
        out = kernels.swiglu_forward(gate, up, kernel_activation(activation))
        dg, du = kernels.swiglu_backward(grad_out, gate, up, kernel_activation(activation))
    assert_close((out, dg, du), oracle(gate, up, grad_out, activation), 1e-5)


@needs_triton
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_kernel_saturated_gates_stay_finite(activation):
    # Far out the sigmoid's exp overflows to inf (GELU's cubic gets there first): the activation
    # must saturate to 0 or the identity, not produce inf * 0 = NaN.
    gate = torch.tensor([[-200.0, -60.0, -20.0, -8.0, 0.0, 8.0, 20.0, 60.0, 200.0]], device=DEVICE)
    up, grad_out = torch.ones_like(gate), torch.ones_like(gate)
    out = kernels.swiglu_forward(gate, up, kernel_activation(activation))
    dg, du = kernels.swiglu_backward(grad_out, gate, up, kernel_activation(activation))
    ref_out, ref_dg, ref_du = oracle(gate, up, grad_out, activation)
    for got, ref in ((out, ref_out), (dg, ref_dg), (du, ref_du)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


def test_kernel_rejects_an_unknown_activation():
    if kernels is None:
        pytest.skip("triton is not installed")
    with pytest.raises(ValueError, match="activation must be one of"):
        kernels.launch_config(64, 2)


@needs_triton
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_op_triton_autograd(activation, dtype):
    gate, up, grad_out = make((2, 7, 45), dtype, seed=1)
    gate.requires_grad_()
    up.requires_grad_()
    with poisoned_allocations():
        out = ops.gated_activation(gate, up, activation, force="triton")
        dg, du = torch.autograd.grad(out, (gate, up), grad_out)
    assert dg.dtype == du.dtype == out.dtype == dtype
    assert_close((out, dg, du), oracle(gate, up, grad_out, activation), TOL[dtype])


@needs_triton
def test_swiglu_is_the_silu_case():
    gate, up, grad_out = make((3, 7, 37), torch.float32, seed=6)
    assert torch.equal(ops.swiglu(gate, up, force="triton"), ops.gated_activation(gate, up, force="triton"))
    assert torch.equal(ops.swiglu(gate, up, force="triton"), ops.gated_activation(gate, up, "silu", force="triton"))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_fp64_matches_oracle(activation):
    gate, up, grad_out = make((3, 4, 33), torch.float64, seed=2)
    gate.requires_grad_()
    up.requires_grad_()
    out = ops.gated_activation(gate, up, ops.Activation(activation), force="reference")
    dg, du = torch.autograd.grad(out, (gate, up), grad_out)
    assert_close((out, dg, du), oracle(gate, up, grad_out, activation), 1e-12)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_low_precision(activation, dtype):
    gate, up, grad_out = make((5, 64), dtype, seed=3)
    gate.requires_grad_()
    up.requires_grad_()
    out = ops.gated_activation(gate, up, activation, force="reference")
    dg, du = torch.autograd.grad(out, (gate, up), grad_out)
    assert dg.dtype == du.dtype == out.dtype == dtype
    assert_close((out, dg, du), oracle(gate, up, grad_out, activation), TOL[dtype])


def test_op_validates_activation_and_shapes():
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="'gelu' is not a valid Activation"):
        ops.gated_activation(x, x, "gelu")
    with pytest.raises(ValueError, match="must have the same shape"):
        ops.gated_activation(x, torch.randn(4), "gelu_tanh")
