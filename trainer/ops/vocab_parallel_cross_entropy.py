"""Cross-entropy over a vocabulary split across tensor-parallel ranks, logits never whole on any rank.

Each rank holds rows [start, start + V/N) of the output projection and every token's hidden state.
Per chunk of tokens, a rank computes only its slice of the logits, then one all-gather of two
numbers per token (the slice's logsumexp and, on the rank whose slice holds the label, the label's
logit) gives every rank the full logsumexp and the target logit (Megatron-LM's vocabulary-parallel
cross-entropy, Shoeybi et al. 2019, section 3, with the max/sum all-reduces folded into one gather
of logsumexps). Backward recomputes the chunk's logits: the gradient of the hidden states is each
rank's partial sum over its vocabulary slice (the caller sums it over the ranks), the weight's is
the rank's own rows. For a summed loss (training's) both gradients are made in the forward's
chunk loop instead, as the fused loss does (trainer/ops/cross_entropy.py): the logits are computed
once, and backward only scales them.

The chunks keep a rank's logits about as large as the hidden states (as the fused loss does), so
memory is flat in the vocabulary; the matmuls run in the inputs' dtype and everything after them in
fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from trainer.constants import IGNORE_INDEX
from trainer.ops.cross_entropy import exp_floor


def chunk_size(n_tokens: int, hidden_size: int, local_vocab: int) -> int:
    """Tokens per chunk: a chunk's fp32 logits about as large as the fp32 hidden states of all tokens."""
    return max(1, min(n_tokens, (n_tokens * hidden_size) // max(local_vocab, 1)))


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp32, or fp64 for fp64 inputs


def _local_logits(h: Tensor, weight: Tensor, softcap: float | None) -> Tensor:
    logits = h @ weight.T
    logits = logits.to(_accumulation_dtype(logits.dtype))
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_start, group, ignore_index, softcap, summed):
        """Per-token losses, or (summed) their sum with both gradients made here, chunk by chunk,
        and only scaled in backward: the logits are never computed twice."""
        n, local_vocab = hidden.shape[0], weight.shape[0]
        world = dist.get_world_size(group)
        step = chunk_size(n, hidden.shape[1], local_vocab)
        losses = torch.empty(n, dtype=_accumulation_dtype(hidden.dtype), device=hidden.device)
        lse = torch.empty_like(losses)
        early = summed and any(ctx.needs_input_grad[:2])
        if early:
            grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            grad_weight = torch.zeros(weight.shape, dtype=_accumulation_dtype(weight.dtype), device=weight.device)
        keep = labels != ignore_index
        for start in range(0, n, step):
            rows = slice(start, min(start + step, n))
            logits = _local_logits(hidden[rows], weight, softcap)
            local = labels[rows] - vocab_start
            here = (local >= 0) & (local < local_vocab)
            target = logits.gather(1, local.clamp(0, local_vocab - 1)[:, None])[:, 0] * here
            peak = logits.amax(dim=1)
            # kept: the softmax's numerators, for the gradient
            exps = (logits - peak[:, None]).clamp_(min=exp_floor(logits.dtype)).exp_()
            mine = torch.stack((peak + exps.sum(dim=1).log(), target))  # (2, chunk): this slice's lse, target
            everyone = torch.empty((world * 2, mine.shape[1]), dtype=mine.dtype, device=mine.device)
            dist.all_gather_single(everyone, mine, group=group)
            everyone = everyone.view(world, 2, -1)
            lse[rows] = torch.logsumexp(everyone[:, 0], dim=0)
            losses[rows] = lse[rows] - everyone[:, 1].sum(dim=0)
            if early:  # the softmax over the whole vocabulary, this rank's slice of it
                probs = exps.mul_(torch.exp(peak - lse[rows])[:, None])
                _chunk_grads(
                    probs, logits, local, here, keep[rows], softcap, hidden, rows, weight, grad_hidden, grad_weight
                )
        losses = losses.masked_fill(~keep, 0.0)
        ctx.summed = summed
        if early:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
            return losses.sum()
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.vocab_start, ctx.ignore_index, ctx.softcap, ctx.step = vocab_start, ignore_index, softcap, step
        return losses.sum() if summed else losses

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.summed:  # made in forward for a loss of 1; the sum's gradient scales them
            grad_hidden, grad_weight = ctx.saved_tensors
            scale = grad_out.to(grad_weight.dtype)
            grad_hidden = None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype)
            return grad_hidden, grad_weight * scale, None, None, None, None, None, None
        hidden, weight, labels, lse = ctx.saved_tensors
        n, local_vocab = hidden.shape[0], weight.shape[0]
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=_accumulation_dtype(weight.dtype), device=weight.device)
        keep = labels != ctx.ignore_index
        scale = grad_out.to(lse.dtype)
        for start in range(0, n, ctx.step):
            rows = slice(start, min(start + ctx.step, n))
            logits = _local_logits(hidden[rows], weight, ctx.softcap)
            local = labels[rows] - ctx.vocab_start
            here = (local >= 0) & (local < local_vocab)
            token_scale = scale[rows] * keep[rows]
            probs = (logits - lse[rows, None]).clamp_(min=exp_floor(logits.dtype)).exp_()
            _chunk_grads(
                probs, logits, local, here, token_scale, ctx.softcap, hidden, rows, weight, grad_hidden, grad_weight
            )
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None, None, None


def _chunk_grads(probs, logits, local, here, token_scale, softcap, hidden, rows, weight, grad_hidden, grad_weight):
    """Adds one chunk's gradients: the loss's over its logits, (softmax - one-hot) times
    token_scale (a weight per token; 0 drops ignored ones), through the softcap, into this rank's
    part of grad_hidden[rows] and into grad_weight. probs (this rank's slice of the softmax over
    the whole vocabulary) becomes the logits' gradient in place."""
    grad = probs
    grad[here, local[here]] -= 1.0
    grad *= token_scale.to(grad.dtype)[:, None]
    if softcap is not None:  # d/dz softcap * tanh(z / softcap) = 1 - tanh^2
        grad *= 1.0 - (logits / softcap) ** 2
    grad = grad.to(hidden.dtype)
    if grad_hidden is not None:
        grad_hidden[rows] = grad @ weight
    grad_weight += grad.T.to(grad_weight.dtype) @ hidden[rows].to(grad_weight.dtype)


def vocab_parallel_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    vocab_start: int,
    group: dist.ProcessGroup,
    ignore_index: int = IGNORE_INDEX,
    softcap: float | None = None,
    reduction: str = "none",
) -> Tensor:
    """Per-token losses, shaped like `labels` (reduction="none"), or their sum ("sum"), of
    (hidden @ W.T) against `labels`, where `weight` is this rank's rows [vocab_start, vocab_start +
    len(weight)) of W and the ranks of `group` hold the rest. hidden (..., hidden_size) is every
    token's (the same on every rank); ignored labels give 0. With "sum" both gradients are made
    in forward (the logits computed once); "none" computes them again in backward.

    The gradient reaching `hidden` is this rank's part only: the caller sums it over `group` (a
    DTensor with a Partial placement does). Every rank must call it with the same tokens."""
    if reduction not in ("none", "sum"):
        raise ValueError(f"reduction must be none or sum, got {reduction!r}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} need the same leading shape")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):  # as a linear layer under autocast would compute
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    summed = reduction == "sum"
    with torch.autocast(device_type, enabled=False):
        loss = _VocabParallelCrossEntropy.apply(
            hidden.reshape(-1, hidden.shape[-1]),
            weight,
            labels.reshape(-1),
            vocab_start,
            group,
            ignore_index,
            softcap,
            summed,
        )
    return loss if summed else loss.view(labels.shape)
