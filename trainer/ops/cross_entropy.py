"""Linear layer + cross-entropy without materialising the (tokens x vocab) logits.

The reference path works through the tokens chunk by chunk: a chunk's logits live only while its
loss and gradients are computed. With a scalar reduction the gradients are computed in the forward
pass (the backward only scales them), which saves the second logits matmul a recompute would cost;
with reduction="none" the per-token upstream gradients are only known in backward, so the chunks are
recomputed there.
"""

import math

import torch

REDUCTIONS = ("mean", "sum", "none")


def chunk_size(n_tokens: int, hidden_size: int, vocab_size: int) -> int:
    # Keep a chunk's logits about as large as the hidden states themselves (the idea behind
    # Liger-Kernel's chunking): memory stays flat in the vocabulary size.
    n_chunks = math.ceil(vocab_size / hidden_size)
    return max(1, min(n_tokens, math.ceil(n_tokens / n_chunks)))


def _chunk_loss_and_grad(h, weight, bias, y, ignore_index, label_smoothing, z_loss, softcap, want_grad):
    """Per-token loss (fp32, zero where ignored) and d loss / d logits (fp32) for one chunk."""
    acc = torch.promote_types(h.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    z = (h @ weight.t()).to(acc)
    if bias is not None:
        z += bias.to(acc)
    if softcap is not None:
        z = torch.tanh(z / softcap).mul_(softcap)
    valid = y != ignore_index
    y_safe = torch.where(valid, y, 0)
    lse = torch.logsumexp(z, dim=-1)
    loss = lse - z.gather(1, y_safe[:, None]).squeeze(1)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss + label_smoothing * (lse - z.mean(dim=-1))
    if z_loss:
        loss = loss + z_loss * lse.square()
    loss = torch.where(valid, loss, 0.0)
    if not want_grad:
        return loss, None

    cap_slope = 1 - (z / softcap).square() if softcap is not None else None
    d = z.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
    if z_loss:
        d.mul_((1 + 2 * z_loss * lse)[:, None])
    if label_smoothing:
        d.sub_(label_smoothing / z.shape[1])
    d.scatter_add_(1, y_safe[:, None], torch.full_like(lse, -(1 - label_smoothing))[:, None])
    if cap_slope is not None:
        d.mul_(cap_slope)
    d.mul_(valid[:, None])
    return loss, d


def _accumulate_grads(d, h, weight, grad_h, grad_w, grad_b, rows):
    """grad_h[rows] = d @ W; grad_w += d^T h (fp32 across chunks); grad_b += sum d."""
    d_low = d.to(weight.dtype)
    grad_h[rows] = (d_low @ weight).to(grad_h.dtype)
    grad_w += d_low.t() @ h
    if grad_b is not None:
        grad_b += d.sum(0)


def _fp32_grad_buffers(weight, bias):
    # The weight gradient sums over every chunk: accumulating it in bf16 made training diverge in
    # Liger-Kernel (their issues #512 and #827), so it is kept in fp32 (fp64 for fp64 weights).
    acc = torch.promote_types(weight.dtype, torch.float32)
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    grad_b = None if bias is None else torch.zeros(weight.shape[0], dtype=acc, device=weight.device)
    return grad_w, grad_b


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, reduction, normalizer,
                label_smoothing, z_loss, softcap):
        n, hidden_size = hidden.shape
        size = chunk_size(n, hidden_size, weight.shape[0])
        eager = any(ctx.needs_input_grad[:3]) and reduction != "none"
        if eager:
            grad_h = torch.empty_like(hidden)
            grad_w, grad_b = _fp32_grad_buffers(weight, bias)
        losses = torch.empty(n, dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        for start in range(0, n, size):
            rows = slice(start, start + size)
            losses[rows], d = _chunk_loss_and_grad(hidden[rows], weight, bias, labels[rows], ignore_index,
                                                   label_smoothing, z_loss, softcap, eager)
            if eager:
                _accumulate_grads(d, hidden[rows], weight, grad_h, grad_w, grad_b, rows)

        if reduction == "none":
            ctx.save_for_backward(hidden, weight, bias, labels)
            ctx.args = (ignore_index, label_smoothing, z_loss, softcap, size)
            return losses
        if reduction == "sum":
            scale = 1.0
        else:  # an all-ignored batch gives zero loss and zero gradients, not 0/0
            count = (labels != ignore_index).sum().clamp(min=1) if normalizer is None else normalizer
            scale = 1.0 / torch.as_tensor(count, dtype=losses.dtype, device=losses.device)
        loss = losses.sum() * scale
        if eager:
            ctx.grads = (grad_h, grad_w, grad_b, scale)
            ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        if hasattr(ctx, "grads"):
            grad_h, grad_w, grad_b, scale = ctx.grads
            del ctx.grads
            g = grad_out * scale
            w_dtype, b_dtype = ctx.dtypes
            grad_h = grad_h * g.to(grad_h.dtype)
            grad_w = (grad_w * g).to(w_dtype)
            grad_b = None if grad_b is None else (grad_b * g).to(b_dtype)
        else:
            hidden, weight, bias, labels = ctx.saved_tensors
            ignore_index, label_smoothing, z_loss, softcap, size = ctx.args
            grad_h = torch.empty_like(hidden)
            grad_w, grad_b = _fp32_grad_buffers(weight, bias)
            for start in range(0, hidden.shape[0], size):
                rows = slice(start, start + size)
                _, d = _chunk_loss_and_grad(hidden[rows], weight, bias, labels[rows], ignore_index,
                                            label_smoothing, z_loss, softcap, True)
                d.mul_(grad_out[rows, None].float())
                _accumulate_grads(d, hidden[rows], weight, grad_h, grad_w, grad_b, rows)
            grad_w = grad_w.to(weight.dtype)
            grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None


def linear_cross_entropy_reference(hidden, weight, labels, ignore_index=-100, reduction="mean", *, bias=None,
                                   normalizer=None, label_smoothing=0.0, z_loss=0.0, softcap=None):
    """Chunked pure-PyTorch path: same results as materialised logits, a fraction of the memory."""
    lead_shape = labels.shape
    loss = ChunkedLinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels.reshape(-1), ignore_index, reduction,
        normalizer, label_smoothing, z_loss, softcap)
    return loss.view(lead_shape) if reduction == "none" else loss


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                         reduction: str = "mean", *, bias: torch.Tensor | None = None, normalizer=None,
                         label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
                         force: str | None = None) -> torch.Tensor:
    """Cross-entropy of (hidden @ weight.T + bias) against labels, logits never materialised.

    hidden is (..., hidden_size), labels (...) with the same leading shape. reduction="mean" divides
    the summed token losses by `normalizer` when given (for example the label-token count of a
    whole optimizer step), else by the count of non-ignored labels. z_loss adds z_loss * lse^2 per
    token; softcap applies softcap * tanh(logits / softcap) before the softmax.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} need the same leading shape")
    return linear_cross_entropy_reference(hidden, weight, labels, ignore_index, reduction, bias=bias,
                                          normalizer=normalizer, label_smoothing=label_smoothing,
                                          z_loss=z_loss, softcap=softcap)
