"""The mixture-of-experts feed-forward of Mixtral and Qwen3-MoE: a linear router picks the top-k
experts of each token, and the experts (SwiGLU MLPs, their weights stacked in 3-D tensors as
transformers 5 holds them) run grouped: the token copies sorted by expert, one grouped matrix
multiply per projection (`torch._grouped_mm`) instead of a Python loop of small matmuls.

Router semantics follow the families' Hugging Face modules: softmax over the experts in fp32, the
top-k probabilities, renormalised to sum to one when `moe_norm_topk` (always in Mixtral; Qwen3-MoE's
norm_topk_prob), rounded to the router logits' dtype when `router_round_weights` (Qwen3-MoE).

The load-balancing loss is transformers' `load_balancing_loss_func` (Switch Transformer, Fedus et
al., arXiv:2101.03961, eqs. 4-6, with top-k assignments counted): over every MoE layer of one
forward, E * sum_e f_e * P_e, with f_e the share of top-k assignments expert e received per token
and P_e its mean router probability, each averaged over the layers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from trainer import ops
from trainer.models.config import ModelArgs
from trainer.ops.dispatch import KernelChoice
from trainer.ops.grouped_mm import grouped_mm


def autocast_to(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors in autocast's dtype when it is on: torch._grouped_mm is not on its lists."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in tensors)


class Experts(nn.Module):
    """E SwiGLU experts: gate_up_proj (E, 2I, H) with gate rows first, down_proj (E, H, I)."""

    ADAPTABLE = ("gate_up_proj", "down_proj")  # the weights LoRA may adapt, in PEFT's nesting order

    def __init__(self, args: ModelArgs, kernels: KernelChoice):
        super().__init__()
        e, h, i = args.n_experts, args.hidden_size, args.expert_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))
        self.activation = args.mlp_activation
        self.kernels = kernels
        # LoRA's per-expert adapters (trainer.lora.ExpertLora), set by set_adapter; None: none.
        self.gate_up_proj_lora: nn.Module | None = None
        self.down_proj_lora: nn.Module | None = None

    def set_adapter(self, weight: str, adapter: nn.Module) -> None:
        """Adapters for `weight` (one of ADAPTABLE), which is frozen."""
        if weight not in self.ADAPTABLE:
            raise ValueError(f"{weight!r} is not one of {self.ADAPTABLE}")
        getattr(self, weight).requires_grad_(False)
        setattr(self, f"{weight}_lora", adapter)

    def forward(self, x: Tensor, ends: Tensor) -> Tensor:
        """x: token copies sorted by expert, expert e's rows ending at ends[e] (under expert
        parallelism: this rank's experts, whose weights are the local shards)."""
        x, gate_up, down = autocast_to(x, local(self.gate_up_proj), local(self.down_proj))
        gate_up_out = grouped_mm(x, gate_up.transpose(1, 2), ends)
        if self.gate_up_proj_lora is not None:
            gate_up_out = gate_up_out + self.gate_up_proj_lora(x, ends).to(gate_up_out.dtype)
        gate, up = gate_up_out.chunk(2, dim=-1)
        act = ops.gated_activation(gate, up, self.activation, force=self.kernels.swiglu)
        out = grouped_mm(act, down.transpose(1, 2), ends)
        if self.down_proj_lora is not None:
            out = out + self.down_proj_lora(act, ends).to(out.dtype)
        return out


def local(weight: Tensor) -> Tensor:
    """This rank's part of an expert-parallel weight (a DTensor sharded over the experts), with
    autograd; a plain tensor as it is.

    The loop scales each rank's loss by the world size so that FSDP's average over ranks gives the
    one-process gradient. An expert's gradient is not averaged (every token that reached it, from
    any rank, came through the all-to-all), so its gradient is divided by the world size here, in
    the graph (a hook on the parameter would not survive its materialization)."""
    if not hasattr(weight, "to_local"):
        return weight
    return _ScaleGrad.apply(weight.to_local(), 1.0 / weight.device_mesh.size())


class _ScaleGrad(torch.autograd.Function):
    """The identity, whose backward multiplies the gradient by `scale`."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


class Router(nn.Module):
    """The router's linear map to one logit per expert. Not an nn.Linear, as in transformers 5: the
    adapters and projections that target linear layers (LoRA, GaLore, APOLLO) leave it alone."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(args.n_experts, args.hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class MoE(nn.Module):
    """The sparse feed-forward: router `gate` (a linear to E logits) and the `experts`."""

    def __init__(self, args: ModelArgs, kernels: KernelChoice):
        super().__init__()
        self.n_experts, self.top_k = args.n_experts, args.experts_per_token
        self.norm_topk, self.round_weights = args.moe_norm_topk, args.router_round_weights
        self.gate = Router(args)
        self.experts = Experts(args, kernels)
        # Expert parallelism (trainer/parallel/expert_parallel.py sets it): the process group whose
        # ranks each hold n_experts / size of the experts; None: this process holds them all.
        self.expert_group: dist.ProcessGroup | None = None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(the output, the routing figures): a (2, n_experts) fp32 tensor of the token copies each
        expert received (no gradient) and the sum of each expert's router probability over the
        tokens (with gradient), for the load-balancing loss. Returned, not kept on the module, so
        the layer stays a pure function under torch.compile and activation checkpointing."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.gate(x)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # (tokens, k)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.round_weights:
            weights = weights.to(logits.dtype)
        flat = chosen.flatten()
        # Counted by scatter_add rather than bincount, whose output size needs a host sync.
        counts = torch.zeros(self.n_experts, dtype=torch.int64, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat)
        )
        order = torch.argsort(flat, stable=True)
        token = order // self.top_k  # the token each sorted copy comes from
        if self.expert_group is None:
            out = self.experts(x[token], torch.cumsum(counts, 0))
        else:
            out = self._experts_across_ranks(x[token], counts)
        out = out * weights.flatten()[order, None]
        y = torch.zeros_like(x).index_add_(0, token, out.to(x.dtype))
        return y.view(shape), torch.stack([counts.float(), probs.sum(dim=0)])

    def _experts_across_ranks(self, x: Tensor, counts: Tensor) -> Tensor:
        """The experts on token copies x sorted by expert, when each rank of expert_group holds a
        contiguous block of experts: the copies travel to their expert's rank (all-to-all), are
        regrouped by local expert, computed, and travel back in x's order.

        The split sizes must be on the host for the all-to-all: one sync per MoE layer (torchtitan
        makes the same one; a fixed per-expert capacity would avoid it at the cost of dropped or
        padded tokens)."""
        import torch.distributed._functional_collectives as funcol  # seconds to import: only EP runs pay it

        group = self.expert_group
        ranks = dist.get_world_size(group)
        per_rank = self.n_experts // ranks
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=group)  # [source rank, local expert] counts
        received = received.view(ranks, per_rank)
        send_splits = counts.view(ranks, per_rank).sum(1).tolist()
        recv_splits = received.sum(1).tolist()
        arrived = funcol.all_to_all_single_autograd(x, recv_splits, send_splits, group)
        # arrived rows run by source rank, then local expert: regroup them by local expert
        by_expert = _source_major_to_expert_major(received, sum(recv_splits))
        out = self.experts(arrived[by_expert], torch.cumsum(received.sum(0), 0))
        back = torch.empty_like(by_expert)
        back[by_expert] = torch.arange(by_expert.numel(), device=by_expert.device)
        return funcol.all_to_all_single_autograd(out[back], send_splits, recv_splits, group)


def _source_major_to_expert_major(counts: Tensor, total: int) -> Tensor:
    """Row indices that reorder `total` rows laid out by (source, expert) blocks, of sizes
    counts[source, expert], into (expert, source) order."""
    sources, experts = counts.shape
    starts = (torch.cumsum(counts.flatten(), 0) - counts.flatten()).view(sources, experts)
    block_starts, block_sizes = starts.t().flatten(), counts.t().flatten()
    within = torch.arange(total, device=counts.device) - torch.repeat_interleave(
        torch.cumsum(block_sizes, 0) - block_sizes, block_sizes, output_size=total
    )
    return torch.repeat_interleave(block_starts, block_sizes, output_size=total) + within


def load_balancing_loss(routing: Tensor, tokens: int, n_experts: int) -> Tensor:
    """transformers' load_balancing_loss_func over the MoE layers of one forward (module docstring);
    routing: (MoE layers, 2, n_experts), each layer's MoE.forward figures; tokens: per layer."""
    assigned = routing[:, 0].sum(0) / (routing.shape[0] * tokens)
    probability = routing[:, 1].sum(0) / (routing.shape[0] * tokens)
    return n_experts * (assigned * probability).sum()
