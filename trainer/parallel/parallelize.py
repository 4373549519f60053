"""The one entry point the loop calls: every parallel.* setting applied to a model, in the order they compose."""

from __future__ import annotations

import torch
from torch import nn

from trainer.parallel.checkpointing import apply_activation_checkpointing
from trainer.parallel.compile import apply_compile
from trainer.parallel.distributed import ParallelEnv
from trainer.parallel.expert_parallel import apply_expert_parallel, world_mesh
from trainer.parallel.float8 import apply_float8
from trainer.parallel.fsdp import apply_ddp, apply_fsdp
from trainer.parallel.offload import apply_activation_offloading
from trainer.parallel.tensor_parallel import apply_tensor_parallel
from trainer.parallel.tiled_mlp import apply_tiled_mlp


def parallelize(
    model: nn.Module,
    parallel,
    env: ParallelEnv,
    device: torch.device,
    compute_dtype: torch.dtype,
    float8: str = "none",
) -> nn.Module:
    """Applies `parallel` (a ParallelConfig) and `float8` (train.float8) to `model` in place;
    returns the module to call for training.

    That is the DDP wrapper under DDP, else `model` itself (FSDP2 shards it in place). Order: the
    tiled MLP replaces each dense MLP's forward (inside the block, so a checkpoint re-runs it
    tiled), checkpointing replaces each block's forward, compile then traces it (checkpoint regions
    and all), activation offloading wraps each block's call outside the checkpoint and the compiled
    code (so its hooks see what they save), and FSDP/DDP hooks go on last. With one process, ddp
    and fsdp have nothing to distribute and the model stays as it is. Tensor parallelism splits the
    modules first (env.mesh), and FSDP2 then shards over the data-parallel ranks only (none when
    every rank is in one tensor-parallel group).
    """
    if float8 != "none":  # the linears become Float8Linear before anything wraps the blocks
        apply_float8(model, float8, fsdp=env.distributed and parallel.strategy == "fsdp")
    if env.mesh is not None:
        apply_tensor_parallel(model, env.mesh["tp"])
    apply_tiled_mlp(model, parallel.tiled_mlp)
    apply_activation_checkpointing(model, parallel.activation_checkpointing)
    if parallel.compile:
        apply_compile(model)
    if parallel.activation_offloading:
        apply_activation_offloading(model, device)
    if not env.distributed:
        return model
    if parallel.strategy == "fsdp":
        mesh, experts = None, None
        if env.mesh is not None:
            if env.data_parallel_size == 1:
                return model
            mesh = env.mesh["dp"]
        if parallel.expert_parallel > 1:
            mesh = world_mesh(device.type)
            experts = set(apply_expert_parallel(model, mesh))
        apply_fsdp(
            model,
            device,
            param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
            reshard_after_forward=parallel.fsdp_reshard_after_forward,
            cpu_offload=parallel.fsdp_cpu_offload,
            mesh=mesh,
            ignored_params=experts,
        )
        return model
    return apply_ddp(model, device)
