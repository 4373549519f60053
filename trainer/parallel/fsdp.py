"""Data parallelism: FSDP2 (`fully_shard` per block and at the root) or DDP.

Gradients: both average over ranks by default. The loop divides each rank's summed token loss by
the label-token count of the whole global step and multiplies it by the world size, so after the
average each gradient equals the one-process gradient of the same global batch.

The output projection (`lm_head`) and the embedding stay in the root's FSDP group, never in a
group of their own: the model reads `lm_head.weight` directly for the fused cross-entropy, outside
`lm_head`'s own forward, and the root group is gathered for the whole of the root's forward
(a group on `lm_head` alone would hand the loss a sharded weight). With tied embeddings the two
share one parameter, which must sit in one group anyway.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from trainer.parallel.tensor_parallel import is_tensor_parallel


def apply_fsdp(
    model: nn.Module,
    device: torch.device,
    *,
    param_dtype: torch.dtype | None,
    reshard_after_forward: bool,
    cpu_offload: bool,
    mesh: DeviceMesh | None = None,
    ignored_params: set[nn.Parameter] | None = None,
) -> None:
    """Shards `model` in place over all ranks of the default process group (or `mesh`), leaving
    `ignored_params` (expert-parallel experts, already sharded) as they are.

    param_dtype: the dtype blocks compute in (bf16 gathers bf16 parameters; None keeps the
    stored dtype). Gradients are reduced in fp32 whatever it is, so the average over ranks does
    not lose bits to bf16.
    """
    mesh = mesh or init_device_mesh(device.type, (dist.get_world_size(),))
    mixed_precision = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else OffloadPolicy()
    blocks = list(model.model.layers)
    for index, block in enumerate(blocks):
        # Backward starts with the last block, so resharding it after forward would only gather it again.
        reshard = reshard_after_forward and index < len(blocks) - 1
        fully_shard(
            block,
            mesh=mesh,
            mp_policy=mixed_precision,
            reshard_after_forward=reshard,
            offload_policy=offload,
            ignored_params=ignored_params,
        )
    fully_shard(
        model,
        mesh=mesh,
        mp_policy=mixed_precision,
        reshard_after_forward=reshard_after_forward,
        offload_policy=offload,
        ignored_params=ignored_params,
    )


def apply_ddp(model: nn.Module, device: torch.device) -> DistributedDataParallel:
    """Wraps `model` for DDP; call the wrapper for the training forward, keep `model` for the rest."""
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def is_sharded(model: nn.Module) -> bool:
    """Sharded by FSDP2 or split by tensor parallelism: its checkpoints go through DCP."""
    return isinstance(model, FSDPModule) or is_tensor_parallel(model)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Skips the gradient all-reduce / reduce-scatter of the backward passes inside, when not `enabled`.

    Gradient accumulation needs it only on the last micro-batch of a step; the others add into
    the local (DDP) or unsharded (FSDP) gradients.
    """
    if enabled:
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The gradient norm over all ranks, as a plain tensor (no host sync); clips to `max_norm` when > 0."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
    if dist.is_initialized():
        from torch.distributed.tensor import DTensor  # about a second to import: only distributed runs pay it

        if isinstance(norm, DTensor):
            # Sharded gradients: each rank's norm covers its shards only; the full norm adds them up.
            norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return norm
