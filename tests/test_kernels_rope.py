"""RoPE: the Triton kernel (through the interpreter on CPU) and the reference path, against a
float64 oracle computed from the same inputs."""

import pytest
import torch

import trainer.ops as ops
from trainer.ops.testing import kernel_test_device, poisoned_allocations, rel_err

try:
    from csrc_triton import rope as kernels
except ImportError:  # no triton (macOS, Windows): the reference-path tests still run
    kernels = None
needs_triton = pytest.mark.skipif(kernels is None, reason="triton is not installed")

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEVICE = kernel_test_device()  # CPU through the interpreter, or CUDA when triton compiles for it


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def oracle(q, k, cos, sin, dq_out=None, dk_out=None):
    """fp64 rotated (q, k) and, given upstream gradients, (dq, dk)."""
    qd = q.detach().double().requires_grad_()
    kd = k.detach().double().requires_grad_()
    c, s = cos.double(), sin.double()
    c, s = (c[None, None], s[None, None]) if c.dim() == 2 else (c[:, None], s[:, None])
    qo, ko = qd * c + rotate_half(qd) * s, kd * c + rotate_half(kd) * s
    if dq_out is None:
        return qo.detach(), ko.detach()
    return qo.detach(), ko.detach(), torch.autograd.grad((qo, ko), (qd, kd), (dq_out.double(), dk_out.double()))


def tables(batch, seq, dim, batched, seed=0):
    g = torch.Generator().manual_seed(seed)
    offsets = torch.randint(0, 50, (batch if batched else 1, 1, 1), generator=g)
    pos = torch.arange(seq)[None, :, None] + offsets
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    angles = pos * inv_freq
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().to(DEVICE), emb.sin().to(DEVICE)
    return (cos, sin) if batched else (cos[0], sin[0])


def make(batch, q_heads, k_heads, seq, dim, dtype, transposed, seed=0):
    g = torch.Generator().manual_seed(seed)
    if transposed:  # the usual projection output (batch, seq, heads, dim) viewed as (batch, heads, seq, dim)
        q = torch.randn(batch, seq, q_heads, dim, generator=g).to(dtype).transpose(1, 2)
        k = torch.randn(batch, seq, k_heads, dim, generator=g).to(dtype).transpose(1, 2)
    else:
        q = torch.randn(batch, q_heads, seq, dim, generator=g).to(dtype)
        k = torch.randn(batch, k_heads, seq, dim, generator=g).to(dtype)
    return q.to(DEVICE), k.to(DEVICE)


SHAPES = [
    (1, 1, 1, 1, 2),  # one position, one head, smallest head_dim
    (2, 5, 3, 7, 12),  # GQA with prime counts, half head_dim 6 (not a power of two)
    (2, 4, 2, 8, 16),  # round
]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("batched_table,transposed", [(False, False), (True, True)])
def test_kernel_forward_and_inverse(dtype, shape, batched_table, transposed):
    batch, q_heads, k_heads, seq, dim = shape
    q, k = make(*shape, dtype, transposed)
    cos, sin = tables(batch, seq, dim, batched_table)
    dq_out, dk_out = make(*shape, dtype, transposed=False, seed=1)
    with poisoned_allocations():
        qo, ko = kernels.rope_rotate(q, k, cos, sin)
        dq, dk = kernels.rope_rotate(dq_out, dk_out, cos, sin, inverse=True)
    ref_q, ref_k, (ref_dq, ref_dk) = oracle(q, k, cos, sin, dq_out, dk_out)
    tol = TOL[dtype]
    assert qo.dtype == dtype and ko.dtype == dtype
    assert rel_err(qo, ref_q) <= tol and rel_err(ko, ref_k) <= tol
    assert rel_err(dq, ref_dq) <= tol and rel_err(dk, ref_dk) <= tol
    # Outputs keep the inputs' memory layout: no copy to make anything contiguous.
    assert qo.stride() == q.stride() and ko.stride() == k.stride()


@needs_triton
def test_kernel_many_heads_loop():
    # More heads than one tile holds (tile = 2048 / half head_dim heads): the head loop runs twice.
    q, k = make(1, 40, 3, 2, 128, torch.float32, transposed=False)
    cos, sin = tables(1, 2, 128, batched=False)
    qo, ko = kernels.rope_rotate(q, k, cos, sin)
    ref_q, ref_k = oracle(q, k, cos, sin)
    assert rel_err(qo, ref_q) <= 1e-5 and rel_err(ko, ref_k) <= 1e-5


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_op_triton_autograd(dtype):
    shape = (2, 6, 2, 5, 20)
    q, k = make(*shape, dtype, transposed=True, seed=2)
    q_before, k_before = q.clone(), k.clone()
    cos, sin = tables(2, 5, 20, batched=True, seed=2)
    dq_out, dk_out = make(*shape, dtype, transposed=False, seed=3)
    q.requires_grad_()
    k.requires_grad_()
    with poisoned_allocations():
        qo, ko = ops.rope(q, k, cos, sin, force="triton")
        dq, dk = torch.autograd.grad((qo, ko), (q, k), (dq_out, dk_out))
    ref_q, ref_k, (ref_dq, ref_dk) = oracle(q, k, cos, sin, dq_out, dk_out)
    tol = TOL[dtype]
    assert rel_err(qo, ref_q) <= tol and rel_err(ko, ref_k) <= tol
    assert rel_err(dq, ref_dq) <= tol and rel_err(dk, ref_dk) <= tol
    assert torch.equal(q.detach(), q_before) and torch.equal(k.detach(), k_before)  # inputs untouched


@needs_triton
def test_op_only_q_used_downstream():
    q, k = make(1, 2, 1, 3, 8, torch.float32, transposed=False)
    cos, sin = tables(1, 3, 8, batched=False)
    q.requires_grad_()
    k.requires_grad_()
    qo, _ = ops.rope(q, k, cos, sin, force="triton")
    dq, dk = torch.autograd.grad(qo.sum(), (q, k))
    assert torch.equal(dk, torch.zeros_like(k))
    _, _, (ref_dq, _) = oracle(q, k, cos, sin, torch.ones_like(q), torch.zeros_like(k))
    assert rel_err(dq, ref_dq) <= 1e-5


@pytest.mark.parametrize("batched_table", [False, True])
def test_reference_fp64_matches_oracle(batched_table):
    shape = (2, 4, 2, 6, 10)
    q, k = make(*shape, torch.float64, transposed=True, seed=4)
    cos, sin = tables(2, 6, 10, batched_table, seed=4)
    cos, sin = cos.double(), sin.double()
    dq_out, dk_out = make(*shape, torch.float64, transposed=False, seed=5)
    q.requires_grad_()
    k.requires_grad_()
    qo, ko = ops.rope(q, k, cos, sin, force="reference")
    dq, dk = torch.autograd.grad((qo, ko), (q, k), (dq_out, dk_out))
    ref_q, ref_k, (ref_dq, ref_dk) = oracle(q, k, cos, sin, dq_out, dk_out)
    for out, ref in ((qo, ref_q), (ko, ref_k), (dq, ref_dq), (dk, ref_dk)):
        assert rel_err(out, ref) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_low_precision(dtype):
    shape = (1, 4, 2, 5, 16)
    q, k = make(*shape, dtype, transposed=False, seed=6)
    cos, sin = tables(1, 5, 16, batched=False, seed=6)
    q.requires_grad_()
    qo, ko = ops.rope(q, k, cos, sin, force="reference")
    (dq,) = torch.autograd.grad(qo, (q,), torch.ones_like(qo))
    ref_q, ref_k, (ref_dq, _) = oracle(q, k, cos, sin, torch.ones_like(qo), torch.zeros_like(ko))
    tol = TOL[dtype]
    assert rel_err(qo, ref_q) <= tol and rel_err(ko, ref_k) <= tol and rel_err(dq, ref_dq) <= tol
