"""What a family declares (`Family`), and helpers the families' files share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from trainer.errors import CheckpointError


@dataclass(frozen=True)
class ExpertLayout:
    """How a mixture-of-experts checkpoint stores the experts our model stacks (trainer.models.moe):
    the sparse block's module name, and each expert's gate, up and down projections as separate
    linears under `{block}.experts.{e}.`; the router is `{block}.gate`."""

    block: str
    gate: str
    up: str
    down: str


@dataclass(frozen=True)
class Family:
    name: str  # ModelArgs.family
    architecture: str  # the transformers class: config.json's "architectures"
    model_type: str  # config.json's "model_type"
    # config.json -> the ModelArgs fields this family sets beyond the shared ones; raises
    # CheckpointError for a feature the trainer does not implement.
    args_from_config: Callable[[dict], dict]
    # ModelArgs -> the config.json keys this family writes beyond the shared ones.
    config_from_args: Callable[[object], dict]
    # Where a mixture-of-experts checkpoint keeps its experts; None for a dense family.
    experts: ExpertLayout | None = None


def sliding_layers(cfg: dict, window_layers_from: int | None) -> dict:
    """sliding_window / layer_types from a config that has them (Qwen2/3: use_sliding_window, the
    layers from max_window_layers on, or an explicit layer_types list)."""
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    if window is None:
        return {"sliding_window": None, "layer_types": None}
    n = cfg["num_hidden_layers"]
    types = cfg.get("layer_types") or [
        "sliding_attention" if window_layers_from is not None and i >= window_layers_from else "full_attention"
        for i in range(n)
    ]
    return {"sliding_window": window, "layer_types": tuple(types)}


def refuse_biases(cfg: dict, architecture: str) -> None:
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise CheckpointError(f"{architecture} checkpoints with attention_bias or mlp_bias set are not supported")


def no_qkv_bias(args, architecture: str) -> None:
    """A model with biases on q, k and v only cannot be saved as `architecture`, whose attention_bias
    also puts one on o_proj: such a model is family "qwen2"."""
    if args.qkv_bias:
        raise ValueError(f"{architecture} cannot hold q/k/v biases without an o_proj bias; use family='qwen2'")


def silu_only(cfg: dict, architecture: str) -> dict:
    """The MLP activation of the SwiGLU families: silu, anything else refused."""
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{architecture} with hidden_act={cfg['hidden_act']!r} is not supported; only silu")
    return {"mlp_activation": "silu"}


def n_experts(cfg: dict) -> int:
    # transformers 5 writes num_local_experts for every MoE family; 4 wrote num_experts for Qwen3-MoE
    return cfg["num_local_experts"] if "num_local_experts" in cfg else cfg["num_experts"]


def moe_args(cfg: dict, architecture: str) -> dict:
    """What the MoE families share: experts, top-k, the load-balancing loss weight; refuses router
    settings the trainer does not implement."""
    if cfg.get("router_jitter_noise"):
        raise CheckpointError(
            f"{architecture} with router_jitter_noise={cfg['router_jitter_noise']} is not supported; set it to 0"
        )
    return {
        "n_experts": n_experts(cfg),
        "experts_per_token": cfg.get("num_experts_per_tok", 2),
        "router_aux_loss_coef": float(cfg.get("router_aux_loss_coef", 0.0)),
    }
