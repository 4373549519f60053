"""What an optimizer keeps between steps, for memory accounting."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    """The tensors of `optimizer`'s state; our wrappers (GaLore, layer-wise) list their own."""
    if hasattr(optimizer, "state_tensors"):
        return optimizer.state_tensors()
    return (v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor))


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state; a tensor shared between parameters (bitsandbytes' qmaps) counts once."""
    unique = {id(t): t for t in optimizer_state_tensors(optimizer)}
    return sum(t.numel() * t.element_size() for t in unique.values())
