"""Everything the memory model needs to know about a run, read off its TrainConfig once."""

from __future__ import annotations

from dataclasses import dataclass, replace

from trainer.errors import ConfigError
from trainer.models.config import ModelArgs
from trainer.ops.dispatch import Impl, KernelChoice
from trainer.parallel.offload import MIN_OFFLOAD_BYTES
from trainer.plan.shapes import Param, model_args, parameters

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class Setting:
    args: ModelArgs
    params: list[Param]
    micro_batch: int
    seq_len: int
    grad_accum: int
    world_size: int
    device: str  # "cpu" or "cuda": which kernels run (Triton on CUDA), which allocator counts
    threads: int  # CPU threads (the CPU attention kernel keeps per-thread buffers)
    param_bytes: int  # bytes per weight (train.param_dtype)
    compute_dtype: str  # train.dtype resolved for the device: fp32, bf16 or fp16
    kernels: KernelChoice  # how each op runs, as the model will run it
    checkpointing: str
    compile: bool
    document_mask: bool
    strategy: str
    fsdp_reshard: bool
    fsdp_offload: bool
    optim: object  # the OptimConfig
    max_grad_norm: float
    lora: object | None = None  # the [lora] section when lora.rank > 0
    neftune: bool = False  # train.neftune_alpha > 0: noise added to the embeddings
    tiled_mlp: int = 0  # parallel.tiled_mlp: row tiles of each dense MLP (0: untiled)
    offload: bool = False  # parallel.activation_offloading: saved tensors to pinned host memory (CUDA)
    offload_min_bytes: int = 0  # the smallest saved tensor that travels (trainer.parallel.offload)
    # False: the fused loss's logit chunks left out of the replay, to find the room they have
    # (trainer.plan.predict.ce_chunk_budget)
    loss_chunks: bool = True
    # parallel.tensor_parallel: `args` and `params` are then one rank's (heads, MLP width and
    # vocabulary divided), and the residual stream between the attention and MLP is split along the
    # sequence (trainer/parallel/tensor_parallel.py)
    tensor_parallel: int = 1

    @property
    def data_parallel(self) -> int:
        """The ranks FSDP shards over: the world over the tensor-parallel degree."""
        return self.world_size // self.tensor_parallel

    def runs_triton(self, impl: Impl) -> bool:
        """Whether an op configured as `impl` runs its Triton kernel on the planned device (on CUDA
        an AUTO op does: the planner assumes the GPU machine has triton)."""
        return impl is Impl.TRITON or (impl is Impl.AUTO and self.device == "cuda")

    @property
    def lora_modules(self) -> set[str]:
        """Linear layers that carry LoRA adapters."""
        return {p.name.removesuffix(".lora_A.weight") for p in self.params if p.name.endswith(".lora_A.weight")}

    @property
    def compute_bytes(self) -> int:
        return DTYPE_BYTES[self.compute_dtype]

    @property
    def autocast(self) -> bool:
        return self.compute_bytes != 4

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len


def resolve_compute_dtype(dtype: str, device: str) -> str:
    if dtype == "auto":  # the loop picks bf16 on a GPU that has it: every GPU in the device table does
        return "bf16" if device == "cuda" else "fp32"
    return dtype


def make_setting(
    config,
    device: str,
    world_size: int = 1,
    threads: int | None = None,
    micro_batch: int | None = None,
    args: ModelArgs | None = None,
) -> Setting:
    t, k, p = config.train, config.kernels, config.parallel
    args = args or model_args(config)
    tensor_parallel = p.tensor_parallel if world_size > 1 else 1
    if tensor_parallel > 1:
        args = tensor_parallel_rank_args(args, tensor_parallel)
    problem = args.seq_len_problem(t.seq_len)
    if problem:
        raise ConfigError(f"train.seq_len={t.seq_len} {problem}; lower train.seq_len")
    o = config.optim
    lora = config.lora if getattr(config, "lora", None) is not None and config.lora.rank > 0 else None
    target = {"galore": o.galore_target, "apollo": o.apollo_target}.get(o.name.split("_")[0])
    if threads is None:
        import torch

        threads = t.threads or torch.get_num_threads()
    return Setting(
        args=args,
        params=parameters(args, target, lora),
        micro_batch=micro_batch if micro_batch is not None else t.micro_batch_size,
        seq_len=t.seq_len,
        grad_accum=t.grad_accum_steps,
        world_size=world_size,
        device=device,
        threads=threads,
        param_bytes=DTYPE_BYTES[t.param_dtype],
        compute_dtype=resolve_compute_dtype(t.dtype, device),
        kernels=KernelChoice.from_config(k),
        checkpointing=p.activation_checkpointing,
        compile=p.compile,
        document_mask=config.data.document_mask or config.data.format == "sft",
        strategy=p.strategy if world_size > 1 else "none",
        fsdp_reshard=p.fsdp_reshard_after_forward,
        fsdp_offload=p.fsdp_cpu_offload,
        optim=config.optim,
        max_grad_norm=t.max_grad_norm,
        lora=lora,
        neftune=getattr(t, "neftune_alpha", 0) > 0,
        tiled_mlp=getattr(p, "tiled_mlp", 0),
        offload=getattr(p, "activation_offloading", False),
        offload_min_bytes=MIN_OFFLOAD_BYTES,
        tensor_parallel=tensor_parallel,
    )


def tensor_parallel_rank_args(args: ModelArgs, degree: int) -> ModelArgs:
    """The shape one tensor-parallel rank holds: its heads, MLP columns and vocabulary rows."""
    return replace(
        args,
        n_heads=args.n_heads // degree,
        n_kv_heads=args.n_kv_heads // degree,
        head_dim=args.head_dim,
        intermediate_size=args.intermediate_size // degree,
        vocab_size=args.vocab_size // degree,
    )
