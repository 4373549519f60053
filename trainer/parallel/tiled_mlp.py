"""Tiled MLP (`parallel.tiled_mlp=N`): each dense MLP computed over N tiles of its tokens, with the
(tokens x intermediate_size) activations recomputed tile by tile in backward.

The technique of Arctic Long Sequence Training (Bekman et al., arXiv:2506.13996, section 3.2) and
Liger-Kernel's tiled MLP, written here as one autograd Function:

- forward runs the MLP on one tile of rows at a time without recording a graph, writes each tile's
  output into one output tensor, and keeps only the input x for backward;
- backward runs each tile's forward again with a graph and backpropagates it at once, so only one
  tile's gate, up and activation exist at any moment instead of all the tokens'.

The weight gradients are returned by the Function (the sum over tiles), so every parameter's
AccumulateGrad runs once per backward, as without tiling: DDP's ready-hooks, FSDP2's
reduce-scatter and the layer-wise optimizers' post-accumulate hooks see one gradient. To sum the
tiles in place rather than keep a second full set of weight gradients, the recompute runs with
each trainable parameter temporarily replaced by a leaf alias of itself (same storage), into whose
`.grad` autograd accumulates.

The recompute calls the module's own forward, so whatever the MLP is made of computes as it does
untiled: LoRA adapters (trainer/lora.py LoraLinear), Phi-3's fused gate_up_proj, autocast (the
forward's autocast state is re-entered in backward, where autograd does not keep it) and random
ops such as LoRA dropout (the forward's RNG state is restored for the recompute, and the caller's
restored after it, as torch.utils.checkpoint does).

Rows, not sequence positions, are tiled: x (batch, seq, hidden) is flattened to (batch x seq,
hidden), so each tile is a contiguous block of rows. Tiling does not change the result beyond
floating-point summation order of the weight gradients (a sum of per-tile products instead of one
matmul over all rows); the tests hold fp64 to 1e-12 and fp32 to 1e-6 relative.

MoE layers (trainer/models/moe.py) are left untiled: their experts already run on the routed
token copies, and tiling their input would change which tokens each grouped matmul sees.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from trainer.models.llama import MLP


def _trainable_parameters(module: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """(owner, name, parameter) of every parameter of `module` that requires grad, in a fixed order."""
    found = []
    for owner in module.modules():
        for name, param in owner._parameters.items():
            if param is not None and param.requires_grad:
                found.append((owner, name, param))
    return found


@contextlib.contextmanager
def _aliased(slots: list[tuple[nn.Module, str]], aliases: list[nn.Parameter]):
    """Each (owner, name) parameter replaced by its alias for the duration, then put back."""
    originals = [owner._parameters[name] for owner, name in slots]
    try:
        for (owner, name), alias in zip(slots, aliases):
            owner._parameters[name] = alias
        yield
    finally:
        for (owner, name), original in zip(slots, originals):
            owner._parameters[name] = original


def _autocast_state(device_type: str) -> dict:
    return {
        "device_type": device_type,
        "enabled": torch.is_autocast_enabled(device_type),
        "dtype": torch.get_autocast_dtype(device_type),
        "cache_enabled": torch.is_autocast_cache_enabled(),
    }


class TiledMLPFunction(torch.autograd.Function):
    """out = forward(x) computed over `tiles` row blocks; params are the module's trainable
    parameters (inputs only so that autograd links their gradients to this node)."""

    @staticmethod
    def forward(ctx, forward, slots, tiles: int, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.forward, ctx.slots, ctx.tiles = forward, slots, tiles
        ctx.autocast = _autocast_state(x.device.type)
        ctx.devices = [x.device] if x.device.type == "cuda" else []
        ctx.rng = _rng_state(ctx.devices)
        ctx.save_for_backward(x)
        return run_tiles(forward, tiles, x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        needs_x = ctx.needs_input_grad[3]
        wanted = [i for i, needed in enumerate(ctx.needs_input_grad[4:]) if needed]
        slots = [ctx.slots[i] for i in wanted]
        # Leaf aliases (same storage): autograd adds each tile's weight gradient into their .grad in place.
        aliases = [nn.Parameter(owner._parameters[name].detach()) for owner, name in slots]
        rows = x.detach().reshape(-1, x.shape[-1])
        grads = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = torch.empty_like(rows) if needs_x else None
        start = 0
        with (
            torch.random.fork_rng(devices=ctx.devices),
            _aliased(slots, aliases),
            torch.enable_grad(),
            torch.autocast(**ctx.autocast),
        ):
            _set_rng_state(ctx.rng, ctx.devices)  # the forward's random draws again (dropout), tile by tile
            n = min(ctx.tiles, max(rows.shape[0], 1))
            for tile, grad in zip(rows.tensor_split(n), grads.tensor_split(n)):
                tile = tile.detach().requires_grad_(needs_x)
                # Through a view: autocast caches its casts of leaf tensors that require grad until
                # it exits, which would keep every tile's cast input to the end of the loop.
                y = ctx.forward(tile.view_as(tile))
                inputs = ([tile] if needs_x else []) + aliases
                if inputs and y.requires_grad:
                    torch.autograd.backward(y, grad, inputs=inputs)
                if needs_x and tile.grad is not None:
                    grad_x[start : start + tile.shape[0]] = tile.grad
                elif needs_x:
                    grad_x[start : start + tile.shape[0]] = 0
                start += tile.shape[0]
                del y, tile, inputs  # the tile's gradient too, before the next tile runs
        param_grads: list[torch.Tensor | None] = [None] * (len(ctx.needs_input_grad) - 4)
        for i, alias in zip(wanted, aliases):
            param_grads[i] = alias.grad
            alias.grad = None  # the returned tensor is the only reference: AccumulateGrad may take it over
        ctx.forward = ctx.slots = None
        return None, None, None, None if grad_x is None else grad_x.view_as(x), *param_grads


def _rng_state(devices: list[torch.device]) -> tuple:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _set_rng_state(state: tuple, devices: list[torch.device]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for device, s in zip(devices, cuda):
        torch.cuda.set_rng_state(s, device)


def run_tiles(forward, tiles: int, x: torch.Tensor) -> torch.Tensor:
    """forward(rows) over `tiles` row blocks of x, written into one output: one tile's intermediates
    exist at a time (no graph is recorded here)."""
    rows = x.reshape(-1, x.shape[-1])
    out, start = None, 0
    for tile in rows.tensor_split(min(tiles, max(rows.shape[0], 1))):
        y = forward(tile)
        if out is None:  # the MLP's output dtype (the compute dtype under autocast)
            out = y.new_empty(rows.shape[0], y.shape[-1])
        out[start : start + tile.shape[0]] = y
        start += tile.shape[0]
        del y  # this tile's intermediates go before the next tile's are made
    return out.view(*x.shape[:-1], out.shape[-1])


def tiled_forward(module: nn.Module, plain_forward, tiles: int, x: torch.Tensor) -> torch.Tensor:
    """`plain_forward(x)` (the module's own forward) over `tiles` row blocks of x."""
    found = _trainable_parameters(module)
    if not torch.is_grad_enabled() or not (x.requires_grad or found):
        # No graph to keep (evaluation, generation): the tiles alone bound the intermediates.
        with torch.no_grad():
            return run_tiles(plain_forward, tiles, x)
    slots = [(owner, name) for owner, name, _ in found]
    return TiledMLPFunction.apply(plain_forward, slots, tiles, x, *(p for _, _, p in found))


def apply_tiled_mlp(model: nn.Module, tiles: int) -> int:
    """Computes every dense MLP of `model.model.layers` over `tiles` row tiles (0: leaves the model
    as it is); MoE layers stay untiled. Returns the number of MLPs tiled.

    The MLP's forward is replaced in place (an instance attribute), as checkpointing replaces a
    block's: parameter names, and with them checkpoints, LoRA and FSDP, do not change.
    """
    if tiles < 0:
        raise ValueError(f"tiled_mlp must be >= 0, got {tiles}")
    if tiles == 0:
        return 0
    count = 0
    for block in model.model.layers:
        mlp = block.mlp
        if not isinstance(mlp, MLP):  # MoE: left untiled (see the module docstring)
            continue
        plain = mlp.forward  # the class's forward, bound: what the recompute calls
        mlp.forward = functools.partial(tiled_forward, mlp, plain, tiles)
        count += 1
    return count
