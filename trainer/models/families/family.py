"""What a family declares (`Family`), and helpers the families' files share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from trainer.errors import CheckpointError


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
