"""The Triton kernels compiled for a real GPU, at Llama-3-8B shapes (hidden 4096, intermediate 14336,
32 query / 8 key-value heads of 128, vocabulary 128256, 8192 tokens, bf16) and Llama-3-70B's hidden
8192, the gated activation and RMSNorm also at Gemma 2 9B/27B, Qwen3 8B/32B and Phi-4-mini's widths,
forward and backward through the public ops, against fp64 references computed on the GPU from the
same inputs, with every output allocation poisoned. Skipped without CUDA, with the reason shown
(pytest -ra); benchmarks/gpu_suite.py runs them first on the lent GPU.
"""

import pytest
import torch

import trainer.ops as ops
from trainer.ops.testing import compiled_gpu_skip_reason, poisoned_allocations, rel_err

SKIP_REASON = compiled_gpu_skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")]

IGNORE = -100
TOKENS = 8192
TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-5}  # bf16: a few output roundings (2^-9 each) at most
LLAMA_8B = dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128, vocab=128256)
LLAMA_70B = dict(hidden=8192, intermediate=28672, heads=64, kv_heads=8, head_dim=128, vocab=128256)
SHAPES = {"llama-8b": LLAMA_8B, "llama-70b": LLAMA_70B}
# The newer families' widths (their config.json files on the Hugging Face hub), with the MLP's
# activation and the RMSNorm flavour each uses: Gemma's gelu_tanh and fp32 (1 + weight) norm.
FAMILIES = {
    "gemma2-9b": dict(hidden=3584, intermediate=14336, head_dim=256, heads=16, activation="gelu_tanh", norm="gemma"),
    "gemma2-27b": dict(hidden=4608, intermediate=36864, head_dim=128, heads=32, activation="gelu_tanh", norm="gemma"),
    "qwen3-8b": dict(hidden=4096, intermediate=12288, head_dim=128, heads=32, activation="silu", norm="llama"),
    "qwen3-32b": dict(hidden=5120, intermediate=25600, head_dim=128, heads=64, activation="silu", norm="llama"),
    "phi-4-mini": dict(hidden=3072, intermediate=8192, head_dim=128, heads=24, activation="silu", norm="llama"),
}


def randn(*shape, dtype=torch.bfloat16, scale=1.0, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (scale * torch.randn(*shape, device="cuda", generator=g)).to(dtype)


def grads64(outputs, inputs, grad_outputs):
    return torch.autograd.grad(outputs, inputs, [g.double() for g in grad_outputs])


@pytest.mark.parametrize("model", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_add_rms_norm_and_rms_norm(model, dtype):
    hidden = SHAPES[model]["hidden"]
    x, r = randn(TOKENS, hidden, dtype=dtype, seed=1), randn(TOKENS, hidden, dtype=dtype, seed=2)
    w = (1 + randn(hidden, dtype=torch.float32, scale=0.2, seed=3)).to(dtype)
    dy, ds = randn(TOKENS, hidden, dtype=dtype, seed=4), randn(TOKENS, hidden, dtype=dtype, seed=5)
    leaves = [t.clone().requires_grad_() for t in (x, r, w)]
    with poisoned_allocations():
        total, y = ops.add_rms_norm(*leaves[:2], leaves[2], 1e-5)
        grads = torch.autograd.grad((y, total), leaves, (dy, ds))
        plain = ops.rms_norm(leaves[0], leaves[2], 1e-5)
        plain_grads = torch.autograd.grad(plain, (leaves[0], leaves[2]), dy)

    xd, rd, wd = (t.double().requires_grad_() for t in (x, r, w))
    total_ref = xd + rd
    y_ref = total_ref * torch.rsqrt(total_ref.pow(2).mean(-1, keepdim=True) + 1e-5) * wd
    ref_grads = grads64((y_ref, total_ref), (xd, rd, wd), (dy, ds))
    plain_ref = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * wd
    plain_ref_grads = grads64(plain_ref, (xd, wd), (dy,))

    tol = TOL[dtype]
    assert rel_err(total, total_ref) <= tol and rel_err(y, y_ref) <= tol
    for got, ref in zip(grads, ref_grads, strict=True):
        assert rel_err(got, ref) <= tol
    assert rel_err(plain, plain_ref) <= tol
    for got, ref in zip(plain_grads, plain_ref_grads, strict=True):
        assert rel_err(got, ref) <= tol


@pytest.mark.parametrize("model", list(FAMILIES))
def test_rms_norm_families(model):
    # The family's RMSNorm at its hidden size (add + norm, and the plain norm), and the q-norm over
    # each head (Qwen3, Gemma 3) at its head_dim; Gemma's offset 1 on a weight stored near 0.
    m = FAMILIES[model]
    offset = 1.0 if m["norm"] == "gemma" else 0.0
    eps = 1e-6
    for rows, cols in ((TOKENS, m["hidden"]), (TOKENS * m["heads"], m["head_dim"])):
        x, r = randn(rows, cols, seed=1), randn(rows, cols, seed=2)
        w = (1 - offset + randn(cols, dtype=torch.float32, scale=0.2, seed=3)).to(torch.bfloat16)
        dy, ds = randn(rows, cols, seed=4), randn(rows, cols, seed=5)
        leaves = [t.clone().requires_grad_() for t in (x, r, w)]
        variant = dict(offset=offset, cast=m["norm"])
        with poisoned_allocations():
            total, y = ops.add_rms_norm(leaves[0], leaves[1], leaves[2], eps, **variant)
            grads = torch.autograd.grad((y, total), leaves, (dy, ds))
            plain = ops.rms_norm(leaves[0], leaves[2], eps, **variant)
            plain_grads = torch.autograd.grad(plain, (leaves[0], leaves[2]), dy)

        xd, rd, wd = (t.double().requires_grad_() for t in (x, r, w))
        total_ref = xd + rd
        y_ref = total_ref * torch.rsqrt(total_ref.pow(2).mean(-1, keepdim=True) + eps) * (wd + offset)
        ref_grads = grads64((y_ref, total_ref), (xd, rd, wd), (dy, ds))
        plain_ref = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * (wd + offset)
        plain_ref_grads = grads64(plain_ref, (xd, wd), (dy,))

        tol = TOL[torch.bfloat16]
        assert y.dtype == plain.dtype == torch.bfloat16
        assert rel_err(total, total_ref) <= tol and rel_err(y, y_ref) <= tol and rel_err(plain, plain_ref) <= tol
        for got, ref in zip((*grads, *plain_grads), (*ref_grads, *plain_ref_grads), strict=True):
            assert rel_err(got, ref) <= tol


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@pytest.mark.parametrize("model", list(SHAPES))
def test_rope(model):
    m = SHAPES[model]
    batch, seq = 4, TOKENS // 4
    # The model's layout: (batch, seq, heads, dim) projections viewed as (batch, heads, seq, dim).
    q = randn(batch, seq, m["heads"], m["head_dim"], seed=1).transpose(1, 2)
    k = randn(batch, seq, m["kv_heads"], m["head_dim"], seed=2).transpose(1, 2)
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, m["head_dim"], 2, device="cuda").float() / m["head_dim"])
    angles = torch.arange(seq, device="cuda")[:, None].float() * inv_freq
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    dq, dk = randn(*q.shape, seed=3), randn(*k.shape, seed=4)
    q_leaf, k_leaf = q.detach().requires_grad_(), k.detach().requires_grad_()
    with poisoned_allocations():
        q_out, k_out = ops.rope(q_leaf, k_leaf, cos, sin)
        grads = torch.autograd.grad((q_out, k_out), (q_leaf, k_leaf), (dq, dk))

    qd, kd = q.double().requires_grad_(), k.double().requires_grad_()
    c, s = cos.double(), sin.double()
    q_ref, k_ref = qd * c + _rotate_half(qd) * s, kd * c + _rotate_half(kd) * s
    ref_grads = grads64((q_ref, k_ref), (qd, kd), (dq, dk))
    assert rel_err(q_out, q_ref) <= TOL[torch.bfloat16] and rel_err(k_out, k_ref) <= TOL[torch.bfloat16]
    for got, ref in zip(grads, ref_grads, strict=True):
        assert rel_err(got, ref) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("model", list(SHAPES))
def test_swiglu(model):
    inter = SHAPES[model]["intermediate"]
    gate, up = randn(TOKENS, inter, seed=1), randn(TOKENS, inter, seed=2)
    d_out = randn(TOKENS, inter, seed=3)
    leaves = [gate.clone().requires_grad_(), up.clone().requires_grad_()]
    with poisoned_allocations():
        out = ops.swiglu(*leaves)
        grads = torch.autograd.grad(out, leaves, d_out)
    gd, ud = gate.double().requires_grad_(), up.double().requires_grad_()
    ref = gd * torch.sigmoid(gd) * ud
    ref_grads = grads64(ref, (gd, ud), (d_out,))
    assert rel_err(out, ref) <= TOL[torch.bfloat16]
    for got, ref_grad in zip(grads, ref_grads, strict=True):
        assert rel_err(got, ref_grad) <= TOL[torch.bfloat16]


def act64(g, activation):
    if activation == "silu":
        return g * torch.sigmoid(g)
    # Hendrycks & Gimpel 2016: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    return 0.5 * g * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (g + 0.044715 * g**3)))


@pytest.mark.parametrize("model", list(FAMILIES))
def test_gated_activation(model):
    m = FAMILIES[model]
    inter, activation = m["intermediate"], m["activation"]
    gate, up = randn(TOKENS, inter, seed=1), randn(TOKENS, inter, seed=2)
    d_out = randn(TOKENS, inter, seed=3)
    leaves = [gate.clone().requires_grad_(), up.clone().requires_grad_()]
    with poisoned_allocations():
        out = ops.gated_activation(*leaves, activation)
        grads = torch.autograd.grad(out, leaves, d_out)
    gd, ud = gate.double().requires_grad_(), up.double().requires_grad_()
    ref = act64(gd, activation) * ud
    ref_grads = grads64(ref, (gd, ud), (d_out,))
    assert rel_err(out, ref) <= TOL[torch.bfloat16]
    for got, ref_grad in zip(grads, ref_grads, strict=True):
        assert rel_err(got, ref_grad) <= TOL[torch.bfloat16]


def cross_entropy_oracle(hidden, weight, labels, chunk=1024):
    """fp64 mean loss over non-ignored labels and its gradients, logits materialised chunk by chunk."""
    h, w = hidden.double(), weight.double()
    valid = labels != IGNORE
    count = valid.sum().clamp(min=1).double()
    target = torch.where(valid, labels, 0)
    loss = torch.zeros((), dtype=torch.float64, device="cuda")
    grad_h = torch.empty_like(h)
    grad_w = torch.zeros_like(w)
    for start in range(0, h.shape[0], chunk):
        rows = slice(start, start + chunk)
        z = h[rows] @ w.t()
        lse = torch.logsumexp(z, -1)
        token_loss = lse - z.gather(1, target[rows, None]).squeeze(1)
        loss += torch.where(valid[rows], token_loss, 0.0).sum()
        d = torch.softmax(z, -1)
        d[torch.arange(d.shape[0], device="cuda"), target[rows]] -= 1
        d *= valid[rows, None]
        grad_h[rows] = d @ w
        grad_w += d.t() @ h[rows]
    return loss / count, grad_h / count, grad_w / count


@pytest.mark.parametrize("model", list(SHAPES))
@pytest.mark.parametrize("weights", ["bf16", "fp32-autocast"])
def test_fused_linear_cross_entropy(model, weights):
    m = SHAPES[model]
    hidden = randn(TOKENS, m["hidden"], seed=1)
    weight = randn(m["vocab"], m["hidden"], scale=m["hidden"] ** -0.5, seed=2)
    g = torch.Generator(device="cuda").manual_seed(3)
    labels = torch.randint(0, m["vocab"], (TOKENS,), device="cuda", generator=g)
    ignored = torch.rand(TOKENS, device="cuda", generator=g) < 0.1
    labels[ignored] = IGNORE
    labels[:64] = IGNORE  # a run of ignored tokens, as padding gives
    ignored[:64] = True

    h_leaf = hidden.clone().requires_grad_()
    # fp32-autocast: fp32 parameters under bf16 autocast, the default training setup.
    w_leaf = (weight.float() if weights == "fp32-autocast" else weight.clone()).requires_grad_()
    with poisoned_allocations(), torch.autocast("cuda", torch.bfloat16, enabled=weights == "fp32-autocast"):
        loss = ops.linear_cross_entropy(h_leaf, w_leaf, labels, IGNORE)
        grad_h, grad_w = torch.autograd.grad(loss, (h_leaf, w_leaf))
    ref_loss, ref_grad_h, ref_grad_w = cross_entropy_oracle(hidden, weight, labels)

    assert grad_w.dtype == w_leaf.dtype and grad_h.dtype == torch.bfloat16
    assert rel_err(loss, ref_loss) <= 1e-3  # per-token fp32 losses of bf16 logits, summed
    assert rel_err(grad_h, ref_grad_h) <= TOL[torch.bfloat16]
    assert rel_err(grad_w, ref_grad_w) <= TOL[torch.bfloat16]
    assert torch.count_nonzero(grad_h[ignored]) == 0  # ignored tokens get exactly no gradient
