"""Expert parallelism: each rank holds n_experts / N of every MoE layer's experts, as a DTensor
sharded over the experts (so DCP saves and reshards them like any other parameter), and each MoE
layer sends token copies to their expert's rank and back by all-to-all (trainer/models/moe.py).

The other parameters are sharded by FSDP2 as usual; the experts are left out of FSDP (each rank
already holds only its own). Their gradients need no reduction: every token that reached an expert,
from whichever rank, came through the all-to-all, whose backward returns its gradient to the
expert's rank (trainer.models.moe.local divides it by the world size, as FSDP's average does the
others').
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from trainer.errors import ConfigError
from trainer.models.moe import MoE


def check_expert_parallel(degree: int, n_experts: int, world_size: int) -> None:
    """One line naming the problem when parallel.expert_parallel cannot split this model and world."""
    if degree == 1:
        return
    if n_experts == 0:
        raise ConfigError(f"parallel.expert_parallel={degree} needs a mixture-of-experts model; this one has none")
    if degree != world_size:
        raise ConfigError(
            f"parallel.expert_parallel={degree} must equal the number of ranks ({world_size}) for now; "
            f"launch {degree} processes or set parallel.expert_parallel={world_size}"
        )
    if n_experts % degree:
        fits = [d for d in range(1, n_experts + 1) if n_experts % d == 0]
        raise ConfigError(
            f"parallel.expert_parallel={degree} does not divide the model's {n_experts} experts; "
            f"choose one of {', '.join(map(str, fits))}"
        )


def apply_expert_parallel(model: nn.Module, mesh: DeviceMesh) -> list[nn.Parameter]:
    """Shards every MoE layer's experts over `mesh` (1-D, every rank) in place; returns the expert
    parameters (for FSDP to leave alone)."""
    experts = []
    for module in model.modules():
        if not isinstance(module, MoE):
            continue
        module.expert_group = mesh.get_group()
        for name, param in list(module.experts.named_parameters(recurse=False)):
            sharded = nn.Parameter(distribute_tensor(param.data, mesh, [Shard(0)]), requires_grad=param.requires_grad)
            setattr(module.experts, name, sharded)
            experts.append(sharded)
    return experts


def world_mesh(device_type: str) -> DeviceMesh:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (dist.get_world_size(),))
