"""Optimizer and learning-rate schedule factory."""

from __future__ import annotations

import torch
from torch import nn

from trainer.optim.schedule import build_scheduler, lr_factor


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: norms, biases and embeddings are not decayed."""
    decay, no_decay, seen = [], [], set()
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    on_cuda = next(model.parameters()).is_cuda
    if cfg.name == "adamw":
        # The fused CUDA kernel updates every parameter in one launch; foreach is the CPU fast path.
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                 fused=on_cuda, foreach=None if on_cuda else True)
    raise ValueError(f"unknown optimizer {cfg.name!r}")


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))


__all__ = ["build_optimizer", "build_scheduler", "lr_factor", "param_groups", "state_bytes"]
