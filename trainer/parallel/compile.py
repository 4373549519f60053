"""torch.compile per transformer block.

Compiling each block rather than the whole model keeps compile time flat in depth (identical
blocks share one compiled graph: their parameters are graph inputs, not constants), leaves the
embedding, loss and FSDP/DDP hooks around the blocks eager, and lets FSDP2 shard block by block.
`fullgraph=True` makes a graph break an error instead of a silent slowdown: the ops are custom
ops / autograd Functions that dynamo traces without breaking.
"""

from __future__ import annotations

from torch import nn


def apply_compile(model: nn.Module) -> None:
    """Compiles each block of `model.model.layers` in place (parameter names do not change)."""
    for block in model.model.layers:
        # Module.compile() compiles the module's call in place; torch.compile(block) would wrap it
        # in a new module and prefix every parameter name with `_orig_mod.`.
        block.compile(fullgraph=True)
