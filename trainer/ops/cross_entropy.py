"""Linear layer + cross-entropy without materialising the (tokens x vocab) logits.

Both paths work through the tokens chunk by chunk: a chunk's logits live only while its loss and
gradients are computed. The reference path does that in PyTorch; the Triton path keeps the chunk's
matmuls in torch (cuBLAS, whatever the dtype) and replaces the softmax / loss / d-logits arithmetic
with one kernel that overwrites the chunk's logits buffer with its gradient. With a scalar reduction
the gradients are computed in the forward pass (the backward only scales them), which saves the
second logits matmul a recompute would cost; with reduction="none" the per-token upstream gradients
are only known in backward, so the chunks are recomputed there.

Off the Triton path, logits of at most MAX_MATERIALIZED_LOGIT_BYTES are computed whole instead
(materializes_logits): at that size the chunk loop's fixed cost is more than the whole logits'
memory is worth.

The public function goes through the custom op `trainer::linear_cross_entropy` (and
`trainer::linear_cross_entropy_backward`), so torch.compile keeps one graph around it. The mean is
taken outside the op (sum / count) so no host-device sync is needed anywhere.
"""

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.constants import IGNORE_INDEX
from trainer.errors import ConfigError
from trainer.ops.dispatch import Impl, kernel_errors, use_triton

REDUCTIONS = ("mean", "sum", "none")


# The Triton path's chunks on a GPU hold at least this many tokens (see chunk_tokens); tests lower
# it to exercise many chunks on small inputs.
MIN_TRITON_CHUNK_TOKENS = 1024
# ... as long as a chunk's logits stay within this many bytes.
MAX_TRITON_CHUNK_BYTES = 256 << 20
# Elsewhere (the PyTorch path; the Triton path off a GPU) a chunk's logits in the accumulation dtype
# take at least this many bytes: below it a chunk's fixed cost, two dozen ops and their Python,
# outweighs what the smaller chunk saves (measured on CPU: benchmarks/results/cpu_profile_overhead.md).
# Tests lower it to exercise many chunks on small inputs.
MIN_CHUNK_LOGIT_BYTES = 16 << 20
# Off the Triton path, logits up to this many bytes (accumulation dtype) are computed whole, through
# linear + F.cross_entropy and autograd, when no memory cap is set: the chunked op costs a fixed
# ~0.4 ms more per call on CPU than the whole logits (the custom op's dispatch, its autograd
# wrapper, two dozen small ops: 0.70-0.83 against 0.35-0.39 ms at 8 tokens x 32 vocabulary), which
# at 512 x 320 logits made the loss 1.18-1.26x slower; from 1.25 to 2.5 MiB the two are level
# within noise, from 4 MiB up the chunks are faster (`python benchmarks/bench_kernels.py
# --whole-bound`, benchmarks/README.md). Tests set it to 0 to exercise the chunks on small inputs.
MAX_MATERIALIZED_LOGIT_BYTES = 1 << 20


def materializes_logits(n_tokens: int, vocab_size: int, elem_bytes: int, triton: bool, chunk_bytes: int = 0) -> bool:
    """Whether linear_cross_entropy computes these logits whole (off the Triton path, no cap on the
    chunks' memory, at most MAX_MATERIALIZED_LOGIT_BYTES) instead of chunk by chunk. The memory
    planner and the run's start report ask the same question."""
    logit_bytes = n_tokens * vocab_size * max(elem_bytes, 4)
    return not triton and chunk_bytes == 0 and logit_bytes <= MAX_MATERIALIZED_LOGIT_BYTES


def chunk_tokens(
    n_tokens: int,
    hidden_size: int,
    vocab_size: int,
    elem_bytes: int,
    triton_on_gpu: bool,
    *,
    budget_bytes: int = 0,
    token_bytes: int = 0,
) -> int:
    """Tokens per chunk: the op's one chunking policy (the planner counts the same chunks).

    A chunk's logits are kept about as large as the hidden states themselves (the idea behind
    Liger-Kernel's chunking), so memory stays flat in the vocabulary size. With the Triton kernel
    on a GPU, every chunk's weight-gradient GEMM reads and writes the whole fp32 (vocab x hidden)
    buffer: with a few hundred tokens per chunk that traffic, not the math, sets the time on an
    H100 (the GEMM turns compute-bound near 1k tokens), so there chunks grow to ~1k tokens while
    their logits stay within MAX_TRITON_CHUNK_BYTES. Elsewhere chunks hold at least
    MIN_CHUNK_LOGIT_BYTES of logits: a small model's few thousand tokens make one or a few chunks
    instead of dozens of tiny ones.

    Sized from the shape alone, a chunk grows with the sequence (a 128k-token sequence of an 8B
    Llama makes chunks of 4k tokens: 1 GiB of bf16 logits, twice). budget_bytes > 0 caps what the
    chunks take at once (chunk_peak_bytes) at token_bytes per token of a chunk, the sum of
    chunk_buffers' kept and working bytes (exact from three chunks on, an upper bound for one or
    two), at least one token. It only ever shrinks the chunk: the memory left, not speed, is what
    it answers to.
    """
    n_chunks = math.ceil(vocab_size / hidden_size)
    size = max(1, min(n_tokens, math.ceil(n_tokens / n_chunks)))
    if triton_on_gpu:
        budget = max(1, MAX_TRITON_CHUNK_BYTES // (vocab_size * elem_bytes))
        size = max(size, min(n_tokens, MIN_TRITON_CHUNK_TOKENS, budget))
    else:
        floor = MIN_CHUNK_LOGIT_BYTES // (vocab_size * max(elem_bytes, 4))
        size = max(size, min(n_tokens, floor))
    if budget_bytes > 0:
        if token_bytes <= 0:
            raise ValueError("chunk_tokens: a budget_bytes needs the chunk's token_bytes (chunk_buffers, summed)")
        size = min(size, max(1, budget_bytes // token_bytes))
    return size


def chunk_buffers(vocab_size: int, elem_bytes: int, triton: bool, softcap: bool = False) -> tuple[int, int]:
    """(kept, working): bytes per token of a chunk while the chunks run, beyond what the loss keeps
    anyway. `kept`: a finished chunk's d loss / d logits, still bound while the next chunk is
    computed; `working`: the chunk being computed. Triton: the logits in the hidden dtype, which
    the kernel overwrites with their gradient, one buffer each. Reference: nothing kept (a chunk's
    gradient is freed before the next chunk's logits are made); working, the logits in the
    accumulation dtype (fp32; fp64 for fp64 inputs), which become the gradient in place, beside
    either the matmul's low-precision output or the gradient's low-precision copy (bf16/fp16
    inputs), or the cap's slope (softcap), whichever is larger. (With bf16/fp16 inputs the weight's
    gradient also takes the chunk's hidden rows in fp32, beside the logits: more than the copy
    counted only where the vocabulary is under twice the hidden size.) chunk_peak_bytes adds them
    up."""
    if triton:
        return vocab_size * elem_bytes, vocab_size * elem_bytes
    acc = max(elem_bytes, 4)
    logits = vocab_size * acc
    low_copy = vocab_size * elem_bytes if elem_bytes < acc else 0
    # Beside them, per token: eight values in the accumulation dtype (the row's maximum, sum,
    # log-sum-exp, label logit, loss and the gradient's scales), the label's int64 copy and two
    # masks. Measured on the CPU allocator (tests/test_plan.py) to the byte.
    small = 8 * acc + 8 + 2
    return 0, max(logits + low_copy, 2 * logits if softcap else logits) + small


def chunk_peak_bytes(n_tokens: int, chunk: int, kept: int, working: int) -> int:
    """The most bytes the chunks take at once (kept and working per token: chunk_buffers): the
    first chunk alone, then each chunk beside the previous one's kept buffer. The memory planner
    counts this (trainer/plan/model.py loss_ops)."""
    chunk = min(chunk, n_tokens)
    if chunk >= n_tokens:
        return n_tokens * working
    return max(chunk * working, chunk * kept + min(chunk, n_tokens - chunk) * working)


def _reference_chunk(
    h, weight, bias, y, ignore_index, label_smoothing, z_loss, softcap, want_grad, loss_out, row_scale
):
    """One chunk in PyTorch: writes the per-token losses (accumulation dtype, 0 where ignored) into
    loss_out when given; returns d loss / d logits (accumulation dtype) times row_scale, or None.

    The logits buffer becomes the softmax and then the gradient in place, and the exponentials are
    computed once: logsumexp and then a separate softmax would make a second chunk-sized buffer and
    a second exp pass.
    """
    acc = torch.promote_types(h.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    z = (h @ weight.t()).to(acc)
    if bias is not None:
        z += bias.to(acc)
    cap_slope = None
    if softcap is not None:
        z.div_(softcap).tanh_()
        if want_grad:  # d (softcap * tanh(x / softcap)) / dx = 1 - tanh^2
            cap_slope = z.square().neg_().add_(1)
        z.mul_(softcap)
    valid = y != ignore_index
    # A label outside the vocabulary gives NaN (loss and gradient), as the Triton kernel does, instead
    # of an out-of-bounds gather: check_labels names it on the host before a batch gets here.
    bad = valid & ((y < 0) | (y >= z.shape[1]))
    y_safe = torch.where(valid & ~bad, y, 0)[:, None]
    label_logit = z.gather(1, y_safe).squeeze(1)
    mean_logit = z.mean(dim=-1) if label_smoothing else None
    top = z.amax(dim=-1, keepdim=True)
    # ATen's CPU exp runs 10-15x slower on arguments whose result underflows (logits ~90 below the
    # row's maximum, common in a freshly initialised tied-embedding model: the whole loss then took
    # twice the materialised one's time). Raised to where exp is still a normal number, they add
    # under e * the smallest normal (3e-38 in fp32) each to sums of at least 1.
    exp_sum = z.sub_(top).clamp_(min=exp_floor(acc)).exp_().sum(dim=-1)
    lse = exp_sum.log().add_(top.squeeze(1))
    if loss_out is not None:
        loss = lse - label_logit
        if label_smoothing:
            loss = (1 - label_smoothing) * loss + label_smoothing * (lse - mean_logit)
        if z_loss:
            loss += z_loss * lse.square()
        loss_out.copy_(loss.masked_fill_(~valid, 0.0).masked_fill_(bad, math.nan))
    if not want_grad:
        return None
    # What each token's row of d loss / d logits is multiplied by: 1 (times row_scale), 0 where
    # ignored, NaN where the label is bad.
    scale = torch.where(bad, math.nan, valid.to(acc))
    if row_scale is not None:
        scale *= row_scale.to(acc)
    softmax_scale = scale / exp_sum  # softmax = exp / exp_sum
    if z_loss:  # d (z_loss * lse^2) / d logits = 2 z_loss lse softmax
        softmax_scale *= 1 + 2 * z_loss * lse
    d = z.mul_(softmax_scale[:, None])
    if label_smoothing:
        d.sub_((label_smoothing / z.shape[1]) * scale[:, None])
    d.scatter_add_(1, y_safe, (-(1 - label_smoothing) * scale)[:, None])
    if cap_slope is not None:
        d.mul_(cap_slope)
    return d


@functools.cache
def exp_floor(dtype: torch.dtype) -> float:
    """Where exp stops being a normal number, plus 1. ATen's CPU exp is 10-15x slower on arguments
    whose result underflows (512 x 4096 fp32 logits spread by 30: 32.5 ms against 2.1 ms clamped);
    raised to this, each such term adds under e times the smallest normal to sums of at least 1."""
    return math.log(torch.finfo(dtype).tiny) + 1


def _materialized_losses(hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss, softcap):
    """Per-token losses from the whole logits, through autograd (accumulation dtype, 0 where
    ignored): what the chunks compute, as the eager reference computes it. A label outside the
    vocabulary gives NaN in its loss and its gradients, as in the chunks."""
    acc = torch.promote_types(hidden.dtype, torch.float32)
    z = F.linear(hidden, weight, bias).to(acc)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= z.shape[1]))
    losses = F.cross_entropy(
        z,
        torch.where(bad, 0, labels),  # F.cross_entropy would refuse it: a label it takes, times NaN below
        ignore_index=ignore_index,
        reduction="none",
        label_smoothing=label_smoothing,
    )
    if z_loss:
        losses = losses + z_loss * torch.logsumexp(z, dim=-1).square().masked_fill(~valid, 0.0)
    return losses * torch.where(bad, math.nan, 1.0).to(acc)


def _triton_chunk(h, weight, bias, y, ignore_index, label_smoothing, z_loss, softcap, want_grad, loss_out, row_scale):
    """The Triton version of one chunk: d loss / d logits, in the logits' own buffer and dtype."""
    from csrc_triton.cross_entropy import cross_entropy_rows_

    logits = h @ weight.t()
    with kernel_errors():
        return cross_entropy_rows_(
            logits,
            y,
            bias=bias,
            loss_out=loss_out,
            row_scale=row_scale,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
            compute_grad=want_grad,
        )


def _accumulate_grads(d, h, weight, grad_h, grad_w, grad_b, rows):
    """grad_w += d^T h (fp32 across chunks); grad_b += sum d; grad_h[rows] = d @ W. None = not wanted.
    The weight's gradient first: on CPU its fp32 copy of h is then freed before d's copy in the
    weight's dtype is made, so the two are never held together."""
    if grad_w is not None:
        _accumulate_weight_grad(grad_w, d, h, weight.dtype)
    if grad_b is not None:
        grad_b += d.sum(0, dtype=grad_b.dtype)
    if grad_h is not None:
        d_low = d.to(weight.dtype)
        if grad_h.dtype == weight.dtype:
            torch.matmul(d_low, weight, out=grad_h[rows])  # rows of a contiguous tensor: no temporary
        else:
            grad_h[rows] = (d_low @ weight).to(grad_h.dtype)


def _accumulate_weight_grad(grad_w, d, h, low_dtype):
    # Accumulate inside the GEMM where possible: a separate product would be a (vocab x hidden)
    # temporary written and read again for every chunk.
    if grad_w.dtype == d.dtype == h.dtype:
        grad_w.addmm_(d.t(), h)
    elif not grad_w.is_cuda:
        # A CPU GEMM cannot add a bf16/fp16 product into fp32: the product is taken in fp32 (d as
        # computed, h upcast: a chunk's rows, not a (vocab x hidden) temporary).
        grad_w.addmm_(d.to(grad_w.dtype).t(), h.to(grad_w.dtype))
    elif low_dtype in (torch.bfloat16, torch.float16) and _fp32_addmm_works(grad_w.device, low_dtype):
        # cuBLAS adds the low-precision product straight into the fp32 buffer, without rounding
        # each chunk's product to bf16 first.
        torch.addmm(grad_w, d.to(low_dtype).t(), h.to(low_dtype), out_dtype=torch.float32, out=grad_w)
    else:
        d_low = d.to(low_dtype)
        grad_w += d_low.t() @ h.to(low_dtype)


@functools.cache
def _fp32_addmm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this PyTorch adds a bf16/fp16 matrix product into an fp32 tensor in place (addmm with
    out_dtype and out=self). Checked once per device and dtype on exactly representable values."""
    try:
        a = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], device=device)
        b = torch.tensor([[0.5, 1.0], [1.5, 2.0], [2.5, 3.0]], device=device)
        c = torch.full((2, 2), 0.25, device=device)
        expected = c + a @ b
        torch.addmm(c, a.to(dtype), b.to(dtype), out_dtype=torch.float32, out=c)
        return bool(torch.equal(c, expected))
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _fp32_grad_buffers(weight, bias, want_w=True, want_b=True):
    # The weight gradient sums over every chunk: accumulating it in bf16 made training diverge in
    # Liger-Kernel (their issues #512 and #827), so it is kept in fp32 (fp64 for fp64 weights).
    acc = torch.promote_types(weight.dtype, torch.float32)
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
    grad_b = None if bias is None or not want_b else torch.zeros(weight.shape[0], dtype=acc, device=weight.device)
    return grad_w, grad_b


def _loss_dtype(hidden_dtype: torch.dtype, triton: bool) -> torch.dtype:
    return torch.float32 if triton else torch.promote_types(hidden_dtype, torch.float32)


def _chunked(
    hidden,
    weight,
    bias,
    labels,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    *,
    triton,
    want_loss,
    need_h,
    need_w,
    need_b,
    row_scale=None,
    chunk_bytes=0,
):
    """One pass over the token chunks: per-token losses and/or the gradients.

    row_scale (tokens,) multiplies each token's d loss / d logits (the upstream gradient of
    reduction="none"); chunk_bytes > 0 caps the chunks' logits (chunk_tokens). Returns (losses,
    grad_h, grad_w fp32, grad_b fp32), None where not wanted.
    """
    n, hidden_size = hidden.shape
    vocab, elem = weight.shape[0], hidden.element_size()
    size = chunk_tokens(
        n,
        hidden_size,
        vocab,
        elem,
        triton and hidden.is_cuda,
        budget_bytes=chunk_bytes,
        token_bytes=sum(chunk_buffers(vocab, elem, triton, softcap is not None)),
    )
    want_grad = need_h or need_w or need_b
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w, grad_b = _fp32_grad_buffers(weight, bias, need_w, need_b)
    losses = torch.empty(n, dtype=_loss_dtype(hidden.dtype, triton), device=hidden.device) if want_loss else None
    chunk = _triton_chunk if triton else _reference_chunk
    for start in range(0, n, size):
        rows = slice(start, start + size)
        d = chunk(
            hidden[rows],
            weight,
            bias,
            labels[rows],
            ignore_index,
            label_smoothing,
            z_loss,
            softcap,
            want_grad,
            None if losses is None else losses[rows],
            None if row_scale is None else row_scale[rows],
        )
        if want_grad:
            _accumulate_grads(d, hidden[rows], weight, grad_h, grad_w, grad_b, rows)
        if not triton:
            # Freed before the next chunk's logits are made, so one chunk's buffers are all the
            # reference holds at once (chunk_buffers). The Triton path keeps the buffer until the
            # next chunk's is made, as its chunk_buffers counts (measured on a GPU).
            del d
    return losses, grad_h, grad_w, grad_b


# ---- custom ops: what the public function (and torch.compile) sees ----


def _empty(like: Tensor) -> Tensor:
    # A fresh empty tensor per absent output: custom-op outputs may not alias one another.
    return like.new_empty(0)


@torch.library.custom_op("trainer::linear_cross_entropy", mutates_args=())
def _lce_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    grad_hidden: bool,
    grad_weight: bool,
    grad_bias: bool,
    triton: bool,
    chunk_bytes: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """reduction "sum": (summed loss, grad_hidden, grad_weight fp32, grad_bias fp32) for an upstream
    gradient of 1, the gradients computed along the way (empty where not asked for).
    reduction "none": (per-token losses, three empty tensors); the backward recomputes."""
    grads_in_forward = reduction == "sum"  # with a scalar loss the gradients come out of the forward pass
    # The op fixes its own precision (chunk matmuls in the inputs' dtype, softmax in fp32); an
    # enclosing autocast region has already chosen that dtype in linear_cross_entropy.
    with torch.autocast(hidden.device.type, enabled=False):
        losses, grad_h, grad_w, grad_b = _chunked(
            hidden,
            weight,
            bias,
            labels,
            ignore_index,
            label_smoothing,
            z_loss,
            softcap,
            triton=triton,
            want_loss=True,
            need_h=grads_in_forward and grad_hidden,
            need_w=grads_in_forward and grad_weight,
            need_b=grads_in_forward and grad_bias,
            chunk_bytes=chunk_bytes,
        )
    loss = losses.sum() if grads_in_forward else losses
    return (
        loss,
        _empty(hidden) if grad_h is None else grad_h,
        _empty(hidden) if grad_w is None else grad_w,
        _empty(hidden) if grad_b is None else grad_b,
    )


@_lce_op.register_fake
def _(
    hidden,
    weight,
    bias,
    labels,
    ignore_index,
    reduction,
    label_smoothing,
    z_loss,
    softcap,
    grad_hidden,
    grad_weight,
    grad_bias,
    triton,
    chunk_bytes=0,
):
    grads_in_forward = reduction == "sum"
    acc = torch.promote_types(weight.dtype, torch.float32)
    loss = hidden.new_empty(() if grads_in_forward else (hidden.shape[0],), dtype=_loss_dtype(hidden.dtype, triton))
    grad_h = hidden.new_empty(hidden.shape) if grads_in_forward and grad_hidden else _empty(hidden)
    grad_w = hidden.new_empty(weight.shape, dtype=acc) if grads_in_forward and grad_weight else _empty(hidden)
    has_b = grads_in_forward and grad_bias and bias is not None
    grad_b = hidden.new_empty((weight.shape[0],), dtype=acc) if has_b else _empty(hidden)
    return loss, grad_h, grad_w, grad_b


@torch.library.custom_op("trainer::linear_cross_entropy_backward", mutates_args=())
def _lce_backward_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    grad_losses: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    grad_hidden: bool,
    grad_weight: bool,
    grad_bias: bool,
    triton: bool,
    chunk_bytes: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for reduction="none", recomputing each chunk with the per-token upstream gradient."""
    with torch.autocast(hidden.device.type, enabled=False):
        _, grad_h, grad_w, grad_b = _chunked(
            hidden,
            weight,
            bias,
            labels,
            ignore_index,
            label_smoothing,
            z_loss,
            softcap,
            triton=triton,
            want_loss=False,
            need_h=grad_hidden,
            need_w=grad_weight,
            need_b=grad_bias and bias is not None,
            row_scale=grad_losses,
            chunk_bytes=chunk_bytes,
        )
    return (
        _empty(hidden) if grad_h is None else grad_h,
        _empty(hidden) if grad_w is None else grad_w.to(weight.dtype),
        _empty(hidden) if grad_b is None else grad_b.to(bias.dtype),
    )


@_lce_backward_op.register_fake
def _(
    hidden,
    weight,
    bias,
    labels,
    grad_losses,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    grad_hidden,
    grad_weight,
    grad_bias,
    triton,
    chunk_bytes=0,
):
    return (
        torch.empty_like(hidden) if grad_hidden else _empty(hidden),
        torch.empty_like(weight) if grad_weight else _empty(hidden),
        torch.empty_like(bias) if grad_bias and bias is not None else _empty(hidden),
    )


def _setup_context(ctx, inputs, output):
    (
        hidden,
        weight,
        bias,
        labels,
        ignore_index,
        reduction,
        label_smoothing,
        z_loss,
        softcap,
        grad_hidden,
        grad_weight,
        grad_bias,
        triton,
        chunk_bytes,
    ) = inputs
    _, grad_h, grad_w, grad_b = output
    # The stashed gradients are outputs only so that they can be saved; nothing differentiates them.
    ctx.mark_non_differentiable(grad_h, grad_w, grad_b)
    ctx.set_materialize_grads(False)
    ctx.reduction = reduction
    ctx.flags = (grad_hidden, grad_weight, grad_bias and bias is not None)
    ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
    if reduction == "sum":
        ctx.save_for_backward(grad_h, grad_w, grad_b)
    else:
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.args = (ignore_index, label_smoothing, z_loss, softcap, triton, chunk_bytes)


def _backward(ctx, grad_loss, *_stashed_grads):
    none = (None,) * 11  # the op's arguments after hidden, weight and bias
    want_h, want_w, want_b = ctx.flags
    if grad_loss is None:
        return (None, None, None, *none)
    if ctx.reduction == "sum":
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        # The forward's gradient buffers are scaled in place and cast once: an out-of-place product
        # would be a second fp32 (vocab x hidden) tensor, the largest of the step. They are this
        # graph's own, so a second backward through it (retain_graph) is refused by autograd's
        # in-place check rather than served scaled twice.
        grad_h = grad_h.mul_(grad_loss) if want_h else None
        grad_w = grad_w.mul_(grad_loss).to(w_dtype) if want_w else None
        grad_b = grad_b.mul_(grad_loss).to(b_dtype) if want_b else None
    else:
        hidden, weight, bias, labels = ctx.saved_tensors
        ignore_index, label_smoothing, z_loss, softcap, triton, chunk_bytes = ctx.args
        grad_h, grad_w, grad_b = _lce_backward_op(
            hidden,
            weight,
            bias,
            labels,
            grad_loss,
            ignore_index,
            label_smoothing,
            z_loss,
            softcap,
            want_h,
            want_w,
            want_b,
            triton,
            chunk_bytes,
        )
        grad_h, grad_w, grad_b = (g if want else None for g, want in zip((grad_h, grad_w, grad_b), ctx.flags))
    return (grad_h, grad_w, grad_b, *none)


_lce_op.register_autograd(_backward, setup_context=_setup_context)


def _autocast_inputs(hidden, weight, bias):
    # Inside an autocast region a linear layer would run in the autocast dtype; do the same cast
    # here, outside the op, so that autograd carries the gradients back to fp32 parameters.
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def check_labels(labels: torch.Tensor, vocab_size: int, ignore_index: int = IGNORE_INDEX) -> None:
    """Raises ConfigError naming the first label outside [0, vocab_size) that is not ignore_index.

    Meant for the host copy of a batch, before it moves to the GPU: there the check costs no device
    sync, while inside the loss an out-of-vocabulary label only shows as a NaN loss.
    """
    if labels.device.type != "cpu":
        raise ValueError("check_labels reads labels on the host; call it before the batch moves to the GPU")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        position = tuple(int(i) for i in bad.nonzero()[0])
        value = int(labels[position])
        where = position[0] if len(position) == 1 else position
        raise ConfigError(
            f"label {value} at position {where} is outside the vocabulary [0, {vocab_size}) and is "
            f"not ignore_index {ignore_index}; the tokenizer and model.vocab_size disagree"
        )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    *,
    bias: torch.Tensor | None = None,
    normalizer=None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    force: Impl = Impl.AUTO,
    chunk_bytes: int = 0,
) -> torch.Tensor:
    """Cross-entropy of (hidden @ weight.T + bias) against labels, the logits computed chunk by
    chunk, never whole (but where they are small enough that chunks only cost time:
    materializes_logits).

    hidden is (..., hidden_size), labels (...) with the same leading shape. reduction="mean" divides
    the summed token losses by `normalizer` when given (for example the label-token count of a
    whole optimizer step), else by the count of non-ignored labels. z_loss adds z_loss * lse^2 per
    token; softcap applies softcap * tanh(logits / softcap) before the softmax. chunk_bytes > 0
    caps the bytes the logits' chunks take at once (the model passes KernelChoice.ce_chunk_bytes,
    the memory the planner leaves them); 0 sizes the chunks from the shape alone (chunk_tokens).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} need the same leading shape")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive or None, got {softcap!r}")
    if chunk_bytes < 0:
        raise ValueError(f"chunk_bytes must be >= 0 (0: chunks sized from the shape), got {chunk_bytes!r}")
    triton = use_triton(force, hidden)
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1).long()
    if materializes_logits(flat_hidden.shape[0], weight.shape[0], hidden.element_size(), triton, chunk_bytes):
        losses = _materialized_losses(
            flat_hidden, weight, bias, flat_labels, ignore_index, label_smoothing, z_loss, softcap
        )
        loss = losses if reduction == "none" else losses.sum()
        return _reduce(loss, reduction, labels, flat_labels, ignore_index, normalizer)
    grad_on = torch.is_grad_enabled()
    loss = _lce_op(
        flat_hidden,
        weight,
        bias,
        flat_labels,
        int(ignore_index),
        "none" if reduction == "none" else "sum",
        float(label_smoothing),
        float(z_loss),
        None if softcap is None else float(softcap),
        grad_on and flat_hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
        triton,
        int(chunk_bytes),
    )[0]
    return _reduce(loss, reduction, labels, flat_labels, ignore_index, normalizer)


def _reduce(loss, reduction, labels, flat_labels, ignore_index, normalizer):
    """The per-token losses (reduction "none") in the labels' shape, or the summed loss as asked."""
    if reduction == "none":
        return loss.view(labels.shape)
    if reduction == "sum":
        return loss
    if normalizer is None:
        # An all-ignored batch gives 0 / 1: zero loss and zero gradients, not 0 / 0.
        return loss / (flat_labels != ignore_index).sum().clamp(min=1).to(loss.dtype)
    # A number, or a tensor (a 0-dim CPU one is read as a scalar; no copy or sync either way).
    return loss / normalizer
