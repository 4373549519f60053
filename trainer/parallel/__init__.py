"""Scaling a run: torch.compile per block, activation checkpointing, tiled MLP, activation offloading,
FSDP2 / DDP, process groups."""

from trainer.parallel.checkpointing import apply_activation_checkpointing
from trainer.parallel.compile import apply_compile
from trainer.parallel.distributed import ParallelEnv, all_reduce_sum, init_distributed, main_process_first, shutdown
from trainer.parallel.fsdp import apply_ddp, apply_fsdp, clip_grad_norm, gradient_sync, is_sharded
from trainer.parallel.offload import apply_activation_offloading
from trainer.parallel.parallelize import parallelize
from trainer.parallel.tiled_mlp import apply_tiled_mlp

__all__ = [
    "ParallelEnv",
    "all_reduce_sum",
    "apply_activation_checkpointing",
    "apply_activation_offloading",
    "apply_compile",
    "apply_ddp",
    "apply_fsdp",
    "apply_tiled_mlp",
    "clip_grad_norm",
    "gradient_sync",
    "init_distributed",
    "is_sharded",
    "main_process_first",
    "parallelize",
    "shutdown",
]
