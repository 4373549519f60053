"""Model and optimizer state of a sharded (FSDP) run, through torch.distributed.checkpoint (DCP).

Each rank writes only its own shards; DCP records the global shape of every tensor, so a load
reshards into whatever layout the loading run has: 2 ranks -> 1 process (no process group
needed), 1 -> 2, 4 -> 2. A one-process checkpoint (full tensors, optimizer state keyed by
parameter index) loads into a sharded run through `load_full_state`.
"""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)


def save_sharded(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, trainable_only: bool = False
) -> None:
    """Collective: every rank writes its shards of the model and optimizer into `folder`.

    trainable_only: leave the frozen parameters out (a LoRA run's base model is not checkpointed)."""
    model_state, optim_state = get_state_dict(
        model, optimizer, options=StateDictOptions(ignore_frozen_params=trainable_only)
    )
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(folder))


def save_sharded_async(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainable_only: bool,
    process_group: dist.ProcessGroup,
) -> Future:
    """Collective: save_sharded, with the shards copied to host memory here and written by a thread.
    The future completes on every rank once its shards are written; on rank 0 (DCP's coordinator)
    once every rank's are and the metadata is too. `process_group`: one for the checkpoint alone
    (gloo), so the thread's collectives never interleave with training's."""
    model_state, optim_state = get_state_dict(
        model, optimizer, options=StateDictOptions(ignore_frozen_params=trainable_only)
    )
    state = {"model": model_state, "optimizer": optim_state}
    return dcp.async_save(state, checkpoint_id=str(folder), process_group=process_group)


def load_sharded(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, trainable_only: bool = False
) -> None:
    """Loads a `save_sharded` folder into `model` (and `optimizer`), sharded or not, at any world size."""
    options = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)
    if optimizer is None:
        state = {"model": get_model_state_dict(model, options=options)}
        dcp.load(state, checkpoint_id=str(folder))
        set_model_state_dict(model, state["model"], options=options)
        return
    # The templates carry this run's layout; DCP fills them from the saved shards. An optimizer
    # that has not stepped yet gets its state tensors created by get_state_dict first.
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=options
    )


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the whole model's state on rank 0's CPU (empty on the other ranks). All of it at
    once: exports go through gather_tensors instead, a tensor at a time."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gather_tensors(state: dict[str, torch.Tensor], names: list[str], keep: bool) -> dict[str, torch.Tensor]:
    """Collective: the whole tensors `names` of `state` (DTensors of FSDP2, TP or expert parallelism;
    a plain tensor is whole already), gathered one at a time in the order given, which every rank
    must share. Where `keep`, each comes back as a new CPU tensor; elsewhere each is dropped once
    gathered, so a rank holds at most one whole tensor beyond its shards."""
    # About a second to import: only sharded runs pay it.
    from torch.distributed._functional_collectives import AsyncCollectiveTensor
    from torch.distributed.tensor import DTensor, Replicate

    gathered = {}
    with torch.no_grad():
        for name in names:
            tensor = state[name]
            # A replicated DTensor (TP's norms) or a plain tensor is whole already: it is copied, so
            # that what is kept is never the parameter itself.
            already_whole = not isinstance(tensor, DTensor) or all(p.is_replicate() for p in tensor.placements)
            if isinstance(tensor, DTensor):
                # Offloaded shards (fsdp_cpu_offload) sit on the CPU while the mesh's collectives
                # (NCCL) need them on its device. Redistributing to Replicate, rather than
                # full_tensor(), is what get_model_state_dict does: no autograd node, and the same
                # path for tensor subclasses (an NF4 base weight) as the whole-state gather had.
                if tensor.device.type != tensor.device_mesh.device_type:
                    tensor = tensor.to(tensor.device_mesh.device_type)
                tensor = tensor.redistribute(placements=[Replicate()] * tensor.device_mesh.ndim).to_local()
                if isinstance(tensor, AsyncCollectiveTensor):  # finished before it is read
                    tensor = tensor.wait()
            if keep:
                gathered[name] = tensor.detach().to("cpu", copy=already_whole)
    return gathered


def read_model_tensors(folder: Path, layout: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """The whole tensors `names` of the model saved in `folder` by save_sharded(_async), read back
    from every rank's shards in this process alone (no collective: a background thread may call it
    while training goes on). `layout` gives each one's shape and dtype."""
    state = {name: torch.empty(layout[name].shape, dtype=layout[name].dtype) for name in names}
    dcp.load({"model": state}, checkpoint_id=str(folder), no_dist=True)
    return state


def load_full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, model_state: dict, optimizer_state: dict | None
) -> None:
    """Loads full (one-process) tensors into a sharded model: each rank keeps its own shard.

    `optimizer_state` is a plain `optimizer.state_dict()` (keyed by parameter index) saved by a
    one-process run whose optimizer was built the same way, so index i is this optimizer's i-th
    parameter.
    """
    model_state = dict(model_state)
    if getattr(model.args, "tie_embeddings", False):
        model_state.setdefault("lm_head.weight", model_state["model.embed_tokens.weight"])
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=full)
    if optimizer is None or optimizer_state is None:
        return
    name_of = {id(p): name for name, p in model.named_parameters()}
    names = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
    by_name = {
        "state": {names[index]: value for index, value in optimizer_state["state"].items()},
        "param_groups": [
            {**group, "params": [names[i] for i in group["params"]]} for group in optimizer_state["param_groups"]
        ],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=full)
