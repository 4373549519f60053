"""Gemma 2 (Gemma2ForCausalLM): four RMSNorms a block (before and after attention and the MLP), each
multiplying by (1 + weight) in fp32; GeGLU with tanh GELU; embeddings times sqrt(hidden); scores
scaled by query_pre_attn_scalar ** -0.5 and softcapped, as are the final logits (in the loss too);
sliding-window and global layers alternating, as layer_types says."""

from trainer.errors import CheckpointError
from trainer.models.families.family import Family, no_qkv_bias, refuse_biases

GELU_TANH_NAMES = ("gelu_pytorch_tanh", "gelu_tanh")  # transformers' names of F.gelu(approximate="tanh")


def gemma_args(cfg: dict, architecture: str) -> dict:
    """What Gemma 2 and Gemma 3 share."""
    refuse_biases(cfg, architecture)
    activation = cfg.get("hidden_activation") or cfg.get("hidden_act")
    if activation not in GELU_TANH_NAMES:
        raise CheckpointError(f"{architecture} with hidden_activation={activation!r} is not supported; only tanh GELU")
    if cfg.get("use_bidirectional_attention"):
        raise CheckpointError(f"{architecture} with use_bidirectional_attention (an embedding model) is not supported")
    n = cfg["num_hidden_layers"]
    window = cfg.get("sliding_window")
    types = cfg.get("layer_types") or ["full_attention"] * n
    return {
        "norm_placement": "sandwich",
        "norm_offset": 1.0,
        "norm_cast": "gemma",
        "mlp_activation": "gelu_tanh",
        "embed_scale": True,
        "query_pre_attn_scalar": cfg.get("query_pre_attn_scalar"),
        "attn_softcap": cfg.get("attn_logit_softcapping"),
        "final_softcap": cfg.get("final_logit_softcapping"),
        "sliding_window": window if "sliding_attention" in types else None,
        "layer_types": tuple(types) if "sliding_attention" in types else None,
    }


def gemma_config(args, architecture: str) -> dict:
    no_qkv_bias(args, architecture)
    return {
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "query_pre_attn_scalar": args.query_pre_attn_scalar,
        "attn_logit_softcapping": args.attn_softcap,
        "final_logit_softcapping": args.final_softcap,
        "sliding_window": args.sliding_window,
        "layer_types": list(args.layer_types or ["full_attention"] * args.n_layers),
    }


def args_from_config(cfg: dict) -> dict:
    return gemma_args(cfg, "Gemma2ForCausalLM")


def config_from_args(args) -> dict:
    return gemma_config(args, "Gemma2ForCausalLM")


FAMILY = Family("gemma2", "Gemma2ForCausalLM", "gemma2", args_from_config, config_from_args)
