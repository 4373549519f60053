"""Activation checkpointing per transformer block: none, full or selective.

- full: a block keeps only its input; backward runs its forward again. Activation memory falls to
  one tensor per block, at the price of a second forward (about a third more compute).
- selective (op-level): inside each block the outputs of the matmuls (q/k/v/o and the three MLP
  projections) and of the attention kernel (SDPA, or flex attention for packed documents) are
  saved; everything else (RMSNorm, RoPE, SwiGLU, residual adds, dtype casts) is recomputed in
  backward. Those ops are cheap, memory-bound elementwise work, but their outputs are as large as
  the matmuls' (SwiGLU's alone is intermediate_size wide), so most of the recompute cost of `full`
  goes away while a good part of its memory saving stays.

The block's forward is replaced in place (not wrapped in a new module), so parameter names, and
with them checkpoints and FSDP's view of the model, do not change.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

MODES = ("none", "full", "selective")

# Outputs kept by the selective policy. The attention overloads differ by device and backend;
# only those this build of torch has are listed.
_SAVED_OPS = frozenset(
    op
    for op in (
        getattr(torch.ops.aten, name, None)
        for name in (
            "mm",
            "addmm",
            "bmm",
            "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_efficient_attention",
            "_scaled_dot_product_cudnn_attention",
            "_scaled_dot_product_flash_attention_for_cpu",
        )
    )
    if op is not None
)
# Higher-order operators reach the policy as themselves, not as an overload: flex attention (packed
# documents on CUDA) inside a compiled block, and the compiled flex attention call of an eager block,
# which runs as inductor_compiled_code (the same pair torchtitan saves).
_SAVED_HIGHER_ORDER_OPS = frozenset(
    op
    for op in (getattr(torch._higher_order_ops, name, None) for name in ("flex_attention", "inductor_compiled_code"))
    if op is not None
)


def _save_matmuls_and_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if not torch.is_grad_enabled():
        # An op run without a graph keeps nothing for backward (the tiled MLP's forward,
        # trainer/parallel/tiled_mlp.py, runs its tiles so): caching its output would hold on to
        # every tile's matmul outputs, what tiling exists to free. The re-run sees the same grad
        # mode, so forward and re-run decide alike.
        return CheckpointPolicy.PREFER_RECOMPUTE
    if op in _SAVED_HIGHER_ORDER_OPS or getattr(op, "overloadpacket", None) in _SAVED_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_save_matmuls_and_attention)


def _recomputed_in_backward(forward, selective: bool):
    @functools.wraps(forward)
    def checkpointed_forward(*args, **kwargs):
        if selective:
            return checkpoint(forward, *args, use_reentrant=False, context_fn=_selective_contexts, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return checkpointed_forward


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Applies `mode` (none | full | selective) to every block of `model.model.layers`."""
    if mode not in MODES:
        raise ValueError(f"activation checkpointing mode {mode!r}; expected one of {MODES}")
    if mode == "none":
        return
    for block in model.model.layers:
        # An instance attribute shadows the class's forward; nn.Module.__call__ (and its hooks) stay as they are.
        block.forward = _recomputed_in_backward(block.forward, selective=mode == "selective")
