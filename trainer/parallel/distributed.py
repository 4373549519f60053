"""Process group setup and teardown from the environment `torchrun` and `accelerate launch` provide.

Both launchers export RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT to every worker,
so one `init_process_group("env://")` serves either. gloo runs collectives on CPU tensors, NCCL
on CUDA ones.

Failure stops all ranks: an exception on one rank must not leave the others waiting forever in a
collective. The failing process exits without entering another collective (`shutdown(failed=True)`
skips the barrier), its launcher (torchrun's agent, which `accelerate launch` also uses) sees a
non-zero exit and terminates the other workers, and the peers that are blocked in a gloo/NCCL
collective get a connection error at once instead of waiting for the timeout. The timeout below is
only the last resort (a rank stuck outside any collective).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from trainer.errors import ConfigError

# Long enough for the slowest legitimate wait (rank 0 tokenizing a corpus while the others sit in a
# barrier, or a large checkpoint write), short enough that a wedged job does not burn a day.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class ParallelEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    owns_process_group: bool = False  # created by init_distributed, so shutdown() destroys it
    # parallel.tensor_parallel > 1: the (dp, tp) DeviceMesh (trainer/parallel/tensor_parallel.py);
    # the ranks of one tensor-parallel group train on the same batches.
    mesh: DeviceMesh | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def tensor_parallel(self) -> int:
        return 1 if self.mesh is None else self.mesh.size(1)  # dimensions (dp, tp)

    @property
    def data_parallel_size(self) -> int:
        """How many different batches each step trains on: the ranks over the tensor-parallel degree."""
        return self.world_size // self.tensor_parallel

    @property
    def data_parallel_rank(self) -> int:
        return self.rank // self.tensor_parallel

    @property
    def data_parallel_group(self) -> dist.ProcessGroup | None:
        """The ranks with different batches, this one's among them (None: every rank)."""
        return None if self.mesh is None else self.mesh.get_group("dp")


def env_from_launcher() -> ParallelEnv:
    """Rank and world size as the launcher set them (one process when none did)."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ConfigError(
            "RANK, LOCAL_RANK and WORLD_SIZE must be integers; launch with torchrun or accelerate launch"
        ) from None
    return ParallelEnv(rank=rank, local_rank=local_rank, world_size=world_size)


def init_distributed(strategy: str, device: torch.device, tensor_parallel: int = 1) -> tuple[ParallelEnv, torch.device]:
    """Joins the process group when launched with more than one process; returns (env, this rank's
    device). tensor_parallel > 1 (checked against the world size before) makes the (dp, tp) mesh."""
    env = env_from_launcher()
    if not env.distributed:
        return env, device
    if strategy == "none":
        raise ConfigError(
            f"launched as {env.world_size} processes but parallel.strategy=none: every process would "
            "train its own copy; set parallel.strategy=ddp or fsdp"
        )
    if device.type == "cuda":
        if env.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={env.local_rank} but this node has {torch.cuda.device_count()} GPUs; "
                "launch at most one process per GPU (--nproc_per_node)"
            )
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # else the caller set it up (a notebook, a custom launcher): leave it to them
        on_cuda = device.type == "cuda"
        dist.init_process_group(
            "nccl" if on_cuda else "gloo", timeout=COLLECTIVE_TIMEOUT, device_id=device if on_cuda else None
        )
        env = dataclasses.replace(env, owns_process_group=True)
    if tensor_parallel > 1:
        env = dataclasses.replace(env, mesh=data_and_tensor_mesh(device.type, env.world_size, tensor_parallel))
    return env, device


def data_and_tensor_mesh(device_type: str, world_size: int, tensor_parallel: int) -> DeviceMesh:
    """The (dp, tp) mesh: consecutive ranks form a tensor-parallel group (on a node, its fastest links)."""
    from torch.distributed.device_mesh import init_device_mesh

    shape = (world_size // tensor_parallel, tensor_parallel)
    return init_device_mesh(device_type, shape, mesh_dim_names=("dp", "tp"))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown(env: ParallelEnv, failed: bool) -> None:
    """Leaves the process group init_distributed created. After a failure, no barrier: the peers may never reach it."""
    if not env.owns_process_group or not dist.is_initialized():
        return
    if not failed:
        dist.barrier()  # gloo aborts at exit when a peer still has messages in flight
    dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum over the ranks of `group` (None: all), in place, without a host sync (the identity in one process)."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


@contextlib.contextmanager
def main_process_first(env: ParallelEnv):
    """Rank 0 runs the block first (e.g. tokenizing into the shared cache); the others then read its result."""
    if env.distributed and not env.is_main:
        barrier()
    yield
    if env.distributed and env.is_main:
        barrier()
