"""Scaling a run: torch.compile per block, activation checkpointing, FSDP2 / DDP, process groups."""

from trainer.parallel.checkpointing import apply_activation_checkpointing
from trainer.parallel.compile import apply_compile
from trainer.parallel.distributed import ParallelEnv, all_reduce_sum, init_distributed, main_process_first, shutdown
from trainer.parallel.fsdp import apply_ddp, apply_fsdp, clip_grad_norm, gradient_sync, is_sharded
from trainer.parallel.parallelize import parallelize

__all__ = [
    "ParallelEnv",
    "all_reduce_sum",
    "apply_activation_checkpointing",
    "apply_compile",
    "apply_ddp",
    "apply_fsdp",
    "clip_grad_norm",
    "gradient_sync",
    "init_distributed",
    "is_sharded",
    "main_process_first",
    "parallelize",
    "shutdown",
]
