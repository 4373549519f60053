"""Tensor parallelism with DTensor (parallel.tensor_parallel=N): each block's attention and MLP split
over N ranks, Megatron-LM's way (Shoeybi et al. 2019), with sequence parallelism for the norms
(Korthikanti et al. 2022), on PyTorch's own `parallelize_module` styles.

Between blocks the residual stream is a DTensor sharded along the sequence (Shard(1)): each rank
holds seq_len / N positions and the norms run on them alone. Entering attention or the MLP the
normed input is gathered (all-gather), q/k/v and gate/up are column-parallel (each rank computes
its heads and its slice of the intermediate width, locally), and o_proj and down_proj are
row-parallel, their partial sums reduce-scattered back onto the sequence shards. The embedding is
split by vocabulary rows (a token's row lives on one rank; the others add zeros), and so is the
output projection: the loss is vocabulary-parallel (trainer/ops/vocab_parallel_cross_entropy.py),
so no rank ever holds a token's logits over the whole vocabulary.

Our RMSNorm is a custom op; DTensor learns here how it shards (`register_sharding`): along any
dimension but the normalised one, its weight replicated, the weight's gradient a partial sum over
the ranks (each saw only its positions), which DTensor reduces.

With FSDP2 the mesh is 2-D, (data-parallel, tensor-parallel): rank r is tensor-parallel rank
r % N of data-parallel group r // N, so a node's ranks hold one model's shards.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from trainer.errors import ConfigError
from trainer.models.config import ModelArgs
from trainer.models.llama import DecoderLayer, Transformer


def check_tensor_parallel(degree: int, args: ModelArgs, world_size: int) -> None:
    """One line naming the problem when parallel.tensor_parallel=`degree` cannot split this model
    over `world_size` ranks (checked before anything is loaded)."""
    if degree == 1:
        return
    if world_size % degree:
        raise ConfigError(
            f"parallel.tensor_parallel={degree} does not divide the {world_size} ranks launched; launch a "
            f"multiple of {degree} processes (--nproc_per_node) or change parallel.tensor_parallel"
        )
    sizes = {
        "attention heads": args.n_heads,
        "key/value heads": args.n_kv_heads,
        "MLP width (intermediate_size)": args.intermediate_size,
        "vocabulary": args.vocab_size,
    }
    for what, size in sizes.items():
        if size % degree:
            most = min(args.n_heads, args.n_kv_heads)
            fits = [d for d in range(2, most + 1) if all(s % d == 0 for s in sizes.values())]
            choose = f"choose one of {', '.join(map(str, fits))}" if fits else "use parallel.tensor_parallel=1"
            raise ConfigError(f"parallel.tensor_parallel={degree} does not divide the model's {size} {what}; {choose}")
    unsupported = {
        "a mixture-of-experts model": args.n_experts > 0,
        "fused qkv_proj/gate_up_proj projections (Phi-3)": args.fused_projections,
        "q/k norms over the whole projection (OLMo 2)": args.qk_norm == "projection",
    }
    for what, present in unsupported.items():
        if present:
            raise ConfigError(
                f"parallel.tensor_parallel={degree} cannot split {what} yet; use parallel.tensor_parallel=1"
            )


def apply_tensor_parallel(model: Transformer, mesh: DeviceMesh) -> None:
    """Splits `model` over the 1-D tensor-parallel `mesh` in place (before FSDP2 shards it further)."""
    register_rms_norm_sharding()
    parallelize_module(
        model,
        mesh,
        {
            # Rows of the vocabulary per rank; the looked-up rows leave reduce-scattered over the sequence.
            "model.embed_tokens": RowwiseParallel(
                input_layouts=Replicate(), output_layouts=Shard(1), use_local_output=False
            ),
            "model.norm": SequenceParallel(),
            # The loss reads lm_head.weight (rows of the vocabulary) directly; lm_head's own forward
            # (logits without labels) gathers the whole logits, as generation needs.
            "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
        },
    )
    for block in model.model.layers:
        parallelize_module(block, mesh, block_plan(block))
    model.tie_weights()  # parallelize_module gave embed_tokens and lm_head parameters of their own
    model.vocab_parallel = True


def block_plan(block: DecoderLayer) -> dict[str, object]:
    """The `parallelize_module` plan of one decoder layer, from the modules it has."""
    gathered = Replicate()
    plan: dict[str, object] = {
        # (x, cos, sin, mask): x arrives sequence-sharded and is gathered; the rest is not a DTensor.
        "self_attn": PrepareModuleInput(
            input_layouts=(Shard(1), None, None, None), desired_input_layouts=(gathered, None, None, None)
        ),
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(gathered,)),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
    }
    norms = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
    for norm in norms:
        if hasattr(block, norm):  # which of them a layer has depends on ModelArgs.norm_placement
            plan[norm] = SequenceParallel()
    if block.self_attn.qk_norm == "head":
        # Qwen3/Gemma 3 normalise each head: the rank's own heads (dimension 2 of (b, t, heads, d)),
        # with the weight replicated and its gradient summed over the ranks.
        plan["self_attn.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        plan["self_attn.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
    return plan


@functools.cache
def register_rms_norm_sharding() -> None:
    """Tells DTensor how trainer::rms_norm and its backward shard (once per process): all replicated,
    or every tensor sharded alike along one dimension that is not the normalised one."""

    def layouts(x) -> list:
        return [Replicate(), *(Shard(dim) for dim in range(x.ndim - 1))]

    @register_sharding(torch.ops.trainer.rms_norm.default)
    def forward_rule(x, weight, residual, eps, offset, cast, triton):
        # outputs: (x + residual, or an empty tensor without a residual; normed; rstd)
        # inputs: (x, weight, residual, eps, offset, cast, triton)
        added = residual is not None
        return [
            ([p if added else Replicate(), p, p], [p, Replicate(), p if added else None, None, None, None, None])
            for p in layouts(x)
        ]

    @register_sharding(torch.ops.trainer.rms_norm_backward.default)
    def backward_rule(dy, x, weight, rstd, dsum, offset, cast, triton):
        # outputs: (dx, dweight), dweight a partial sum when each rank saw part of the positions
        # inputs: (dy, x, weight, rstd, dsum, offset, cast, triton)
        return [
            (
                [p, Partial() if isinstance(p, Shard) else Replicate()],
                [p, p, Replicate(), p, None if dsum is None else p, None, None, None],
            )
            for p in layouts(x)
        ]


def is_tensor_parallel(model: nn.Module) -> bool:
    return isinstance(model, Transformer) and model.vocab_parallel
