"""Fused linear cross-entropy: the Triton softmax/loss/d-logits kernel (through the interpreter on
CPU), the Triton path of the op, and the chunked reference path, against a float64 oracle that
materialises the logits from the same inputs."""

import collections

import pytest
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import trainer.ops as ops
from trainer.errors import ConfigError
from trainer.ops import cross_entropy as ce_module
from trainer.ops.testing import kernel_test_device, poisoned_allocations, rel_err

try:
    from csrc_triton import cross_entropy as kernels
except ImportError:  # no triton (macOS, Windows): the reference-path tests still run
    kernels = None
needs_triton = pytest.mark.skipif(kernels is None, reason="triton is not installed")

IGNORE = -100
LOSS_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEVICE = kernel_test_device()  # CPU through the interpreter, or CUDA when triton compiles for it
OPTIONS = {
    "plain": dict(),
    "smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(z_loss=1e-3),
    "softcap": dict(softcap=5.0),
    "all": dict(label_smoothing=0.05, z_loss=1e-2, softcap=3.0),
}


@pytest.fixture(autouse=True)
def many_chunks(monkeypatch):
    """Without the chunks' floor (MIN_CHUNK_LOGIT_BYTES), the small inputs here split into several
    chunks, as a large input does; test_chunk_floor checks the floor itself. Nor are these small
    logits computed whole (MAX_MATERIALIZED_LOGIT_BYTES): the tests that take that path say so
    (take_path)."""
    monkeypatch.setattr(ce_module, "MIN_CHUNK_LOGIT_BYTES", 0)
    monkeypatch.setattr(ce_module, "MAX_MATERIALIZED_LOGIT_BYTES", 0)


PATHS = ["chunks", "whole"]  # the PyTorch path's two ways: chunk by chunk, or the logits materialised


# (force, path) pairs: the Triton path always chunks
FORCE_PATHS = [pytest.param("triton", "chunks", marks=needs_triton), ("reference", "chunks"), ("reference", "whole")]


def record_calls(monkeypatch, name, calls):
    """Appends `name` to `calls` whenever the op calls ce_module.<name>."""
    inner = getattr(ce_module, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return inner(*args, **kwargs)

    monkeypatch.setattr(ce_module, name, spy)


def take_path(monkeypatch, path):
    """Makes the op take `path` whatever the size; returns the list each call of that path appends to."""
    whole = path == "whole"
    monkeypatch.setattr(ce_module, "MAX_MATERIALIZED_LOGIT_BYTES", 1 << 40 if whole else 0)
    calls = []
    record_calls(monkeypatch, "_materialized_losses" if whole else "_chunked", calls)
    return calls


def logits_oracle(z, labels, bias=None, label_smoothing=0.0, z_loss=0.0, softcap=None):
    """fp64 per-row losses of logits z (rows, vocab), autograd-ready in z."""
    if bias is not None:
        z = z + bias
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    valid = labels != IGNORE
    lse = torch.logsumexp(z, dim=-1)
    loss = lse - z.gather(1, torch.where(valid, labels, 0)[:, None]).squeeze(1)
    loss = (1 - label_smoothing) * loss + label_smoothing * (lse - z.mean(-1))
    loss = loss + z_loss * lse.square()
    return torch.where(valid, loss, 0.0)


def oracle(hidden, weight, labels, bias=None, reduction="mean", normalizer=None, grad_out=None, **opts):
    """fp64 loss and gradients for (hidden, weight[, bias]), logits materialised."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    b = None if bias is None else bias.detach().double().requires_grad_()
    flat_labels = labels.reshape(-1)
    losses = logits_oracle(h.reshape(-1, h.shape[-1]) @ w.t(), flat_labels, b, **opts)
    if reduction == "none":
        loss = losses.view(labels.shape)
    elif reduction == "sum":
        loss = losses.sum()
    else:
        count = (flat_labels != IGNORE).sum().clamp(min=1) if normalizer is None else normalizer
        loss = losses.sum() / count
    if grad_out is None:
        grad_out = torch.ones_like(loss)
    inputs = (h, w) if b is None else (h, w, b)
    return loss.detach(), torch.autograd.grad(loss, inputs, grad_out.double())


def make_labels(shape, vocab, n_ignored, seed):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, shape, generator=gen)
    flat = labels.view(-1)
    flat[torch.randperm(flat.numel(), generator=gen)[:n_ignored]] = IGNORE
    return labels.to(DEVICE)


def make(lead, hidden_size, vocab, dtype, seed=0, with_bias=False, n_ignored=2, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    hidden = (scale * torch.randn(*lead, hidden_size, generator=gen)).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5).to(dtype)
    bias = (0.5 * torch.randn(vocab, generator=gen)).to(dtype).to(DEVICE) if with_bias else None
    labels = make_labels(lead, vocab, n_ignored, seed)
    return hidden.to(DEVICE), weight.to(DEVICE), bias, labels


# ---- the kernel alone: rows of logits -> per-row loss and d loss / d logits, in place ----


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "rows,vocab,block",
    [
        (1, 5, None),  # one row, vocab smaller than any block
        (7, 1000, 256),  # vocab not a multiple of the block
        (8, 512, 128),  # round
    ],
)
@pytest.mark.parametrize("option", ["plain", "all"])
def test_kernel_loss_and_grad(dtype, rows, vocab, block, option):
    opts = OPTIONS[option]
    gen = torch.Generator().manual_seed(rows)
    z = (3 * torch.randn(rows, vocab, generator=gen)).to(dtype).to(DEVICE)
    bias = torch.randn(vocab, generator=gen).to(dtype).to(DEVICE) if option == "all" else None
    labels = make_labels((rows,), vocab, n_ignored=1 if rows > 1 else 0, seed=rows)
    row_scale = (torch.rand(rows, generator=gen) + 0.5).to(DEVICE)
    with poisoned_allocations():
        loss = torch.empty(rows, dtype=torch.float32, device=DEVICE)
        d = kernels.cross_entropy_rows_(
            z.clone(), labels, bias=bias, loss_out=loss, row_scale=row_scale, ignore_index=IGNORE, block=block, **opts
        )
    zd = z.double().requires_grad_()
    ref_loss = logits_oracle(zd, labels, None if bias is None else bias.double(), **opts)
    (ref_d,) = torch.autograd.grad(ref_loss, zd, row_scale.double())
    assert d.dtype == dtype
    assert rel_err(loss, ref_loss) <= LOSS_TOL[dtype]
    assert rel_err(d, ref_d) <= LOSS_TOL[dtype]


@needs_triton
def test_kernel_extreme_logits_do_not_overflow():
    z = 1e4 * torch.randn(6, 300, device=DEVICE)
    labels = make_labels((6,), 300, n_ignored=1, seed=0)
    loss = torch.empty(6, device=DEVICE)
    d = kernels.cross_entropy_rows_(z.clone(), labels, loss_out=loss, block=128)
    zd = z.double().requires_grad_()
    ref = logits_oracle(zd, labels)
    (ref_d,) = torch.autograd.grad(ref.sum(), zd)
    assert torch.isfinite(loss).all() and torch.isfinite(d).all()
    assert rel_err(loss, ref) <= 1e-4 and rel_err(d, ref_d) <= 1e-4


# ---- the op through the Triton path ----


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_op_triton_matches_oracle(dtype, reduction):
    hidden, weight, bias, labels = make((3, 7), 32, 300, dtype, seed=1, with_bias=True, n_ignored=4)
    grad_out = (torch.randn(3, 7) if reduction == "none" else torch.tensor(1.0)).to(DEVICE)
    for t in (hidden, weight, bias):
        t.requires_grad_()
    with poisoned_allocations():
        loss = ops.linear_cross_entropy(hidden, weight, labels, IGNORE, reduction, bias=bias, force="triton")
        grads = torch.autograd.grad(loss, (hidden, weight, bias), grad_out)
    ref_loss, ref_grads = oracle(hidden, weight, labels, bias, reduction, grad_out=grad_out)
    tol = LOSS_TOL[dtype]
    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
    assert rel_err(loss, ref_loss) <= tol
    for g, ref, t in zip(grads, ref_grads, (hidden, weight, bias), strict=True):
        assert g.dtype == t.dtype
        assert rel_err(g, ref) <= tol


@needs_triton
@pytest.mark.parametrize("option", list(OPTIONS))
def test_op_triton_options(option):
    # Odd sizes: 2 x 11 tokens, hidden 19, vocab 251 (prime, so no block divides it).
    hidden, weight, bias, labels = make((2, 11), 19, 251, torch.float32, seed=2, with_bias=option == "all")
    normalizer = torch.tensor(40.0, device=DEVICE)  # e.g. the label count of a whole accumulation step
    params = [t.requires_grad_() for t in (hidden, weight, bias) if t is not None]
    with poisoned_allocations():
        loss = ops.linear_cross_entropy(
            hidden, weight, labels, IGNORE, "mean", bias=bias, normalizer=normalizer, force="triton", **OPTIONS[option]
        )
        grads = torch.autograd.grad(loss, params)
    ref_loss, ref_grads = oracle(hidden, weight, labels, bias, "mean", normalizer, **OPTIONS[option])
    assert rel_err(loss, ref_loss) <= 1e-4
    for g, ref in zip(grads, ref_grads, strict=True):
        assert rel_err(g, ref) <= 1e-4


@needs_triton
def test_op_triton_none_backward_with_options():
    # reduction="none" recomputes in backward with per-token upstream gradients (Liger #968).
    hidden, weight, bias, labels = make((9,), 24, 130, torch.float32, seed=3, with_bias=True, n_ignored=3)
    grad_out = torch.randn(9, device=DEVICE)
    for t in (hidden, weight, bias):
        t.requires_grad_()
    loss = ops.linear_cross_entropy(
        hidden, weight, labels, reduction="none", bias=bias, force="triton", **OPTIONS["all"]
    )
    grads = torch.autograd.grad(loss, (hidden, weight, bias), grad_out)
    ref_loss, ref_grads = oracle(hidden, weight, labels, bias, "none", grad_out=grad_out, **OPTIONS["all"])
    assert rel_err(loss, ref_loss) <= 1e-4
    for g, ref in zip(grads, ref_grads, strict=True):
        assert rel_err(g, ref) <= 1e-4


@needs_triton
def test_op_triton_extreme_hidden():
    hidden, weight, _, labels = make((10,), 16, 200, torch.float32, seed=4, scale=1e3)
    hidden.requires_grad_()
    weight.requires_grad_()
    loss = ops.linear_cross_entropy(hidden, weight, labels, force="triton")
    grads = torch.autograd.grad(loss, (hidden, weight))
    ref_loss, ref_grads = oracle(hidden, weight, labels)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    assert rel_err(loss, ref_loss) <= 1e-4
    for g, ref in zip(grads, ref_grads, strict=True):
        assert rel_err(g, ref) <= 1e-4


@pytest.mark.parametrize("force,path", FORCE_PATHS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_zero_grads(monkeypatch, force, path, reduction):
    calls = take_path(monkeypatch, path)
    hidden, weight, _, labels = make((2, 3), 8, 50, torch.float32, seed=5)
    labels.fill_(IGNORE)
    hidden.requires_grad_()
    weight.requires_grad_()
    loss = ops.linear_cross_entropy(hidden, weight, labels, reduction=reduction, force=force)
    gh, gw = torch.autograd.grad(loss.sum(), (hidden, weight))
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(gh, torch.zeros_like(gh)) and torch.equal(gw, torch.zeros_like(gw))
    assert len(calls) == (2 if reduction == "none" and path == "chunks" else 1)  # "none": chunks recomputed


@needs_triton
def test_op_triton_no_grad_and_frozen_weight():
    hidden, weight, _, labels = make((6,), 16, 70, torch.float32, seed=6)
    with torch.no_grad():
        loss = ops.linear_cross_entropy(hidden, weight, labels, force="triton")
    ref_loss, _ = oracle(hidden, weight, labels)
    assert rel_err(loss, ref_loss) <= 1e-4
    hidden.requires_grad_()  # weight frozen: only grad_hidden is computed
    loss = ops.linear_cross_entropy(hidden, weight, labels, force="triton")
    (gh,) = torch.autograd.grad(loss, (hidden,))
    assert rel_err(gh, oracle(hidden, weight, labels)[1][0]) <= 1e-4


@needs_triton
def test_op_triton_weight_grad_accumulates_in_fp32(monkeypatch):
    # Many chunks (vocab / hidden = 32 -> 32 chunks of one token) in bf16: the weight gradient is
    # summed in fp32 and rounded once, so it stays within bf16 tolerance of the fp64 oracle.
    monkeypatch.setattr(ce_module, "MIN_TRITON_CHUNK_TOKENS", 1)  # GPUs otherwise use one big chunk
    hidden, weight, _, labels = make((32,), 8, 256, torch.bfloat16, seed=7, n_ignored=0)
    weight.requires_grad_()
    loss = ops.linear_cross_entropy(hidden, weight, labels, reduction="sum", force="triton")
    (gw,) = torch.autograd.grad(loss, (weight,))
    assert rel_err(gw, oracle(hidden, weight, labels, reduction="sum")[1][1]) <= 2e-2


# ---- the reference (chunked PyTorch) path ----


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_reference_fp64_matches_oracle(monkeypatch, path, reduction, option):
    calls = take_path(monkeypatch, path)
    hidden, weight, bias, labels = make((2, 9), 12, 97, torch.float64, seed=8, with_bias=True, n_ignored=3)
    normalizer = 25 if reduction == "mean" and option == "all" else None
    grad_out = (torch.randn(2, 9) if reduction == "none" else torch.tensor(1.0)).to(DEVICE, torch.float64)
    for t in (hidden, weight, bias):
        t.requires_grad_()
    loss = ops.linear_cross_entropy(
        hidden,
        weight,
        labels,
        IGNORE,
        reduction,
        bias=bias,
        normalizer=normalizer,
        force="reference",
        **OPTIONS[option],
    )
    grads = torch.autograd.grad(loss, (hidden, weight, bias), grad_out)
    ref_loss, ref_grads = oracle(hidden, weight, labels, bias, reduction, normalizer, grad_out, **OPTIONS[option])
    assert calls
    assert rel_err(loss, ref_loss) <= 1e-12
    for g, ref in zip(grads, ref_grads, strict=True):
        assert rel_err(g, ref) <= 1e-12


# ---- chunks capped by a memory budget (chunk_bytes: KernelChoice.ce_chunk_bytes) ----


def _chunk_rows(monkeypatch, name):
    """Records the rows of each chunk the op computes through ce_module.<name>."""
    rows, inner = [], getattr(ce_module, name)

    def spy(h, *args, **kwargs):
        rows.append(h.shape[0])
        return inner(h, *args, **kwargs)

    monkeypatch.setattr(ce_module, name, spy)
    return rows


# (leading shape, hidden, vocab, tokens the budget allows): odd sizes, where no chunk divides the
# tokens, and round ones
CAPPED = [((3, 13), 24, 67, 5), ((1, 29), 17, 131, 3), ((2, 32), 32, 128, 8)]  # shape chunks: 13, 4, 16


@pytest.mark.parametrize("lead,hidden_size,vocab,tokens", CAPPED)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_reference_capped_chunks_match_the_oracle(monkeypatch, lead, hidden_size, vocab, tokens, reduction):
    """A budget of `tokens` tokens' logits (the reference works in one fp64 buffer of a chunk's
    logits, which becomes its gradient) splits the tokens into chunks of at most that many, far
    below the shape's chunk, and the loss and every gradient still equal the fp64 materialised
    logits (reduction none recomputes the chunks in backward)."""
    n = lead[0] * lead[1]
    kept, working = ce_module.chunk_buffers(vocab, 8, triton=False)
    assert kept == 0 and vocab * 8 < working < vocab * 8 + 100  # the logits and a few per-token values
    budget = (tokens + 1) * working - 1  # one byte short of tokens + 1
    hidden, weight, bias, labels = make(lead, hidden_size, vocab, torch.float64, seed=n, with_bias=True, n_ignored=3)
    for t in (hidden, weight, bias):
        t.requires_grad_()
    grad_out = (torch.randn(lead) if reduction == "none" else torch.tensor(1.0)).to(DEVICE, torch.float64)
    rows = _chunk_rows(monkeypatch, "_reference_chunk")
    loss = ops.linear_cross_entropy(
        hidden, weight, labels, IGNORE, reduction, bias=bias, force="reference", chunk_bytes=budget, z_loss=1e-3
    )
    grads = torch.autograd.grad(loss, (hidden, weight, bias), grad_out)
    passes = 2 if reduction == "none" else 1  # forward, and the recompute in backward
    assert rows == [tokens] * (n // tokens) * passes or rows == ([tokens] * (n // tokens) + [n % tokens]) * passes
    ref_loss, ref_grads = oracle(hidden, weight, labels, bias, reduction, grad_out=grad_out, z_loss=1e-3)
    assert rel_err(loss, ref_loss) <= 1e-12
    for g, ref in zip(grads, ref_grads, strict=True):
        assert rel_err(g, ref) <= 1e-12


def test_reference_capped_chunks_fp32_against_fp64(monkeypatch):
    """fp32 inputs at 7-token chunks (a budget of 7 tokens' fp32 logits) against the fp64 oracle, to
    fp32's accuracy."""
    hidden, weight, _, labels = make((5, 11), 20, 89, torch.float32, seed=3, n_ignored=4)
    hidden.requires_grad_()
    weight.requires_grad_()
    rows = _chunk_rows(monkeypatch, "_reference_chunk")
    per_token = sum(ce_module.chunk_buffers(89, 4, triton=False))
    loss = ops.linear_cross_entropy(hidden, weight, labels, force="reference", chunk_bytes=7 * per_token)
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert rows == [7] * 7 + [6]
    ref_loss, ref_grads = oracle(hidden, weight, labels)
    assert rel_err(loss, ref_loss) <= 1e-6
    for g, ref in zip(grads, ref_grads, strict=True):
        assert rel_err(g, ref) <= 1e-5


@needs_triton
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_triton_capped_chunks_match_the_oracle(monkeypatch, reduction):
    """The Triton path: its chunk buffers hold the logits in the hidden dtype, the previous chunk's
    and the current one; a budget of 4 tokens' gives chunks of 4 rows out of 23 (the shape's: 6)."""
    hidden, weight, bias, labels = make((1, 23), 64, 251, torch.float32, seed=5, with_bias=True, n_ignored=2)
    for t in (hidden, weight, bias):
        t.requires_grad_()
    grad_out = (torch.randn(1, 23) if reduction == "none" else torch.tensor(1.0)).to(DEVICE)
    rows = _chunk_rows(monkeypatch, "_triton_chunk")
    loss = ops.linear_cross_entropy(
        hidden, weight, labels, IGNORE, reduction, bias=bias, force="triton", chunk_bytes=4 * 2 * 251 * 4
    )
    grads = torch.autograd.grad(loss, (hidden, weight, bias), grad_out)
    assert rows == ([4] * 5 + [3]) * (2 if reduction == "none" else 1)
    ref_loss, ref_grads = oracle(hidden, weight, labels, bias, reduction, grad_out=grad_out)
    assert rel_err(loss, ref_loss) <= 1e-5
    for g, ref in zip(grads, ref_grads, strict=True):
        assert rel_err(g, ref) <= 1e-5


def test_a_budget_only_ever_shrinks_the_chunk():
    """chunk_tokens: a budget larger than the shape's chunk needs leaves it; a smaller one caps it,
    never below one token; a budget without the chunk's bytes per token is refused."""
    shape = ce_module.chunk_tokens(1000, 64, 640, 4, False)  # 1000 tokens over ceil(640 / 64) = 10 chunks
    assert shape == 100
    per_token = sum(ce_module.chunk_buffers(640, 4, triton=False))
    assert 640 * 4 < per_token < 640 * 4 + 50  # the logits, which become their gradient in place, and
    # a few per-token values
    assert ce_module.chunk_tokens(1000, 64, 640, 4, False, budget_bytes=10**12, token_bytes=per_token) == 100
    assert ce_module.chunk_tokens(1000, 64, 640, 4, False, budget_bytes=37 * per_token, token_bytes=per_token) == 37
    assert ce_module.chunk_tokens(1000, 64, 640, 4, False, budget_bytes=1, token_bytes=per_token) == 1
    with pytest.raises(ValueError, match="token_bytes"):
        ce_module.chunk_tokens(1000, 64, 640, 4, False, budget_bytes=10)
    with pytest.raises(ValueError, match="chunk_bytes must be >= 0"):
        ops.linear_cross_entropy(torch.zeros(2, 4), torch.zeros(8, 4), torch.zeros(2, dtype=torch.long), chunk_bytes=-1)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_chunk_floor(monkeypatch, reduction):
    """Off a GPU's Triton path a chunk holds at least MIN_CHUNK_LOGIT_BYTES of logits in the
    accumulation dtype (here 10 tokens' worth of fp64 logits, vocabulary 53): 37 tokens make chunks
    of 10, 10, 10 and 7 where the shape alone makes 13 chunks of 3; a budget still caps below the
    floor, and a GPU's Triton chunks keep their own minimum. The loss and gradients equal the fp64
    oracle."""
    monkeypatch.setattr(ce_module, "MIN_CHUNK_LOGIT_BYTES", 10 * 53 * 8 + 7)
    assert ce_module.chunk_tokens(37, 3, 53, 8, False) == 10
    assert ce_module.chunk_tokens(5, 3, 53, 8, False) == 5  # never more than the tokens
    per_token = sum(ce_module.chunk_buffers(53, 8, triton=False))
    assert ce_module.chunk_tokens(37, 3, 53, 8, False, budget_bytes=4 * per_token, token_bytes=per_token) == 4
    monkeypatch.setattr(ce_module, "MIN_TRITON_CHUNK_TOKENS", 6)
    assert ce_module.chunk_tokens(37, 3, 53, 8, True) == 6
    monkeypatch.setattr(ce_module, "MIN_CHUNK_LOGIT_BYTES", 0)
    assert ce_module.chunk_tokens(37, 3, 53, 8, False) == 3  # the shape alone: ceil(37 / ceil(53 / 3))
    monkeypatch.setattr(ce_module, "MIN_CHUNK_LOGIT_BYTES", 10 * 53 * 8 + 7)

    hidden, weight, bias, labels = make((37,), 3, 53, torch.float64, seed=12, with_bias=True, n_ignored=5)
    for t in (hidden, weight, bias):
        t.requires_grad_()
    grad_out = (torch.randn(37) if reduction == "none" else torch.tensor(1.0)).to(DEVICE, torch.float64)
    rows = _chunk_rows(monkeypatch, "_reference_chunk")
    loss = ops.linear_cross_entropy(
        hidden, weight, labels, IGNORE, reduction, bias=bias, force="reference", **OPTIONS["all"]
    )
    grads = torch.autograd.grad(loss, (hidden, weight, bias), grad_out)
    assert rows == [10, 10, 10, 7] * (2 if reduction == "none" else 1)
    ref_loss, ref_grads = oracle(hidden, weight, labels, bias, reduction, grad_out=grad_out, **OPTIONS["all"])
    assert rel_err(loss, ref_loss) <= 1e-12
    for g, ref in zip(grads, ref_grads, strict=True):
        assert rel_err(g, ref) <= 1e-12


def test_small_logits_are_computed_whole(monkeypatch):
    """Off the Triton path, logits of at most MAX_MATERIALIZED_LOGIT_BYTES in the accumulation
    dtype are computed whole, unless the chunks' memory is capped; the Triton path always chunks."""
    monkeypatch.setattr(ce_module, "MAX_MATERIALIZED_LOGIT_BYTES", 1 << 20)
    rule = ce_module.materializes_logits
    assert rule(1024, 256, 4, triton=False) and not rule(1025, 256, 4, triton=False)  # 1 MiB of fp32
    assert rule(1024, 256, 2, triton=False)  # bf16 logits are counted in fp32
    assert not rule(1024, 256, 8, triton=False)  # fp64: 2 MiB
    assert not rule(8, 32, 4, triton=True)
    assert not rule(8, 32, 4, triton=False, chunk_bytes=1 << 30)

    ran = []
    record_calls(monkeypatch, "_materialized_losses", ran)
    record_calls(monkeypatch, "_chunked", ran)
    for tokens, chunk_bytes in ((1024, 0), (1025, 0), (1024, 1 << 30)):
        hidden, weight, _, labels = make((tokens,), 4, 256, torch.float32, seed=tokens)
        ops.linear_cross_entropy(hidden, weight, labels, force="reference", chunk_bytes=chunk_bytes)
    assert ran == ["_materialized_losses", "_chunked", "_chunked"]


@pytest.mark.parametrize("path", PATHS)
def test_reference_far_below_the_maximum(monkeypatch, path):
    """Logits spread over thousands (hidden scaled by 1e3): most exponentials underflow, and the
    fp32 loss and gradients still match the fp64 oracle (the exponent's floor changes nothing a
    float32 can hold)."""
    calls = take_path(monkeypatch, path)
    hidden, weight, _, labels = make((3, 7), 16, 211, torch.float32, seed=13, scale=1e3)
    hidden.requires_grad_()
    weight.requires_grad_()
    loss = ops.linear_cross_entropy(hidden, weight, labels, force="reference", z_loss=1e-4)
    grads = torch.autograd.grad(loss, (hidden, weight))
    ref_loss, ref_grads = oracle(hidden, weight, labels, z_loss=1e-4)
    assert calls and torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    assert rel_err(loss, ref_loss) <= 1e-5
    for g, ref in zip(grads, ref_grads, strict=True):
        assert rel_err(g, ref) <= 1e-5


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_low_precision(monkeypatch, path, dtype):
    calls = take_path(monkeypatch, path)
    hidden, weight, _, labels = make((4, 5), 16, 120, dtype, seed=9)
    hidden.requires_grad_()
    weight.requires_grad_()
    loss = ops.linear_cross_entropy(hidden, weight, labels, force="reference", z_loss=1e-3)
    grads = torch.autograd.grad(loss, (hidden, weight))
    ref_loss, ref_grads = oracle(hidden, weight, labels, z_loss=1e-3)
    assert calls and loss.dtype == torch.float32
    assert rel_err(loss, ref_loss) <= LOSS_TOL[dtype]
    for g, ref in zip(grads, ref_grads, strict=True):
        assert rel_err(g, ref) <= LOSS_TOL[dtype]


def test_gradient_accumulation_with_normalizer_is_exact():
    # Two micro-batches, each divided by the label count of the whole step, sum to the loss and
    # gradients of the whole batch.
    hidden, weight, _, labels = make((2, 8), 12, 40, torch.float64, seed=11, n_ignored=5)
    weight.requires_grad_()
    total = (labels != IGNORE).sum()
    parts = [
        ops.linear_cross_entropy(hidden[i], weight, labels[i], normalizer=total, force="reference") for i in range(2)
    ]
    (g_parts,) = torch.autograd.grad(sum(parts), (weight,))
    whole = ops.linear_cross_entropy(hidden, weight, labels, force="reference")
    (g_whole,) = torch.autograd.grad(whole, (weight,))
    assert rel_err(sum(parts), whole) <= 1e-14 and rel_err(g_parts, g_whole) <= 1e-14


def test_rejects_bad_arguments():
    hidden, weight, _, labels = make((4,), 8, 20, torch.float32)
    with pytest.raises(ValueError):
        ops.linear_cross_entropy(hidden, weight, labels, reduction="avg")
    with pytest.raises(ValueError):
        ops.linear_cross_entropy(hidden, weight, labels[:3])
    with pytest.raises(ValueError):
        ops.linear_cross_entropy(hidden, weight, labels, softcap=0.0)


# ---- labels outside the vocabulary ----


def test_check_labels_names_the_offending_label():
    labels = torch.randint(0, 32000, (2, 20))
    labels[0, 3] = IGNORE
    ops.check_labels(labels, 32000)  # in range, or ignored: nothing to say
    labels[1, 17] = 70000
    with pytest.raises(ConfigError) as info:
        ops.check_labels(labels, 32000)
    assert str(info.value) == (
        "label 70000 at position (1, 17) is outside the vocabulary [0, 32000) and is not "
        "ignore_index -100; the tokenizer and model.vocab_size disagree"
    )
    flat = torch.tensor([5, -1, 7])  # negative, and not ignore_index
    with pytest.raises(ConfigError, match=r"label -1 at position 1 is outside the vocabulary \[0, 10\)"):
        ops.check_labels(flat, 10)
    ops.check_labels(torch.tensor([5, -1, 7]), 10, ignore_index=-1)


def test_check_labels_refuses_device_tensors():
    # On a GPU the check would cost a sync per batch: it is for the host copy only.
    with pytest.raises(ValueError, match="on the host"):
        ops.check_labels(torch.empty(4, dtype=torch.int64, device="meta"), 10)


@pytest.mark.parametrize("force,path", FORCE_PATHS)
def test_out_of_vocabulary_label_gives_nan_not_a_plausible_loss(monkeypatch, force, path):
    # Without check_labels a bad label must not read past the logits row nor yield a finite loss.
    calls = take_path(monkeypatch, path)
    hidden, weight, _, labels = make((9,), 16, 50, torch.float32, seed=12, n_ignored=2)
    good = labels.clone()
    bad_rows = [i for i in range(9) if labels[i] != IGNORE][:2]
    labels[bad_rows[0]], labels[bad_rows[1]] = 50, -3
    hidden.requires_grad_()
    losses = ops.linear_cross_entropy(hidden, weight, labels, reduction="none", force=force)
    (gh,) = torch.autograd.grad(losses.sum(), (hidden,))
    ref_losses, (ref_gh, _) = oracle(hidden, weight, good, reduction="none")
    others = [i for i in range(9) if i not in bad_rows]
    assert torch.isnan(losses[bad_rows]).all() and torch.isnan(gh[bad_rows]).all()
    assert rel_err(losses[others], ref_losses[others]) <= 1e-4
    assert rel_err(gh[others], ref_gh[others]) <= 1e-4
    assert torch.isnan(ops.linear_cross_entropy(hidden, weight, labels, force=force))
    assert calls


# ---- memory of the backward: the fp32 weight gradient is scaled in place, cast once ----


class _WeightShapedAllocations(TorchDispatchMode):
    """Counts, per dtype, the fresh tensors of `shape` that ops return (in-place results and views of
    an input are not fresh)."""

    def __init__(self, shape):
        super().__init__()
        self.shape = torch.Size(shape)
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
        }
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.shape == self.shape and t.untyped_storage().data_ptr() not in inputs:
                self.counts[t.dtype] += 1
        return out


@pytest.mark.parametrize("force", [pytest.param("triton", marks=needs_triton), "reference"])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_backward_adds_no_second_fp32_weight_gradient(force, weight_dtype):
    hidden, weight, _, labels = make((4, 6), 16, 96, weight_dtype, seed=13)
    weight.requires_grad_()
    loss = ops.linear_cross_entropy(hidden, weight, labels, force=force)
    with _WeightShapedAllocations(weight.shape) as seen:
        (gw,) = torch.autograd.grad(loss, (weight,))
    # fp32 weights: the forward's fp32 buffer, scaled in place, is the gradient; bf16: one cast of it.
    assert seen.counts[torch.float32] == 0
    assert seen.counts[torch.bfloat16] == (1 if weight_dtype == torch.bfloat16 else 0)
    assert gw.dtype == weight_dtype
    assert rel_err(gw, oracle(hidden, weight, labels)[1][1]) <= LOSS_TOL[weight_dtype]


def test_second_backward_through_the_fused_loss_is_refused():
    # Its gradient buffers were consumed in place by the first backward: autograd says so.
    hidden, weight, _, labels = make((5,), 8, 30, torch.float32, seed=14)
    weight.requires_grad_()
    loss = ops.linear_cross_entropy(hidden, weight, labels, force="reference")
    torch.autograd.grad(loss, (weight,), retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, (weight,))
