"""Gemma 3, text (Gemma3ForCausalLM): Gemma 2's block (softcaps off by default) with an RMSNorm over
each head's q and k, five sliding-window layers to each global one (layer_types), and its own RoPE
base for the sliding layers (rope_parameters["sliding_attention"])."""

from trainer.models.families.family import Family
from trainer.models.families.gemma2 import gemma_args, gemma_config


def args_from_config(cfg: dict) -> dict:
    rope = cfg.get("rope_parameters") or {}
    local = (rope.get("sliding_attention") or {}).get("rope_theta", cfg.get("rope_local_base_freq", 10000.0))
    return {**gemma_args(cfg, "Gemma3ForCausalLM"), "qk_norm": "head", "rope_local_theta": float(local)}


def config_from_args(args) -> dict:
    full = {"rope_type": "default", "rope_theta": args.rope_theta, **(args.rope_scaling or {})}
    local = {"rope_type": "default", "rope_theta": args.rope_local_theta}
    return {
        **gemma_config(args, "Gemma3ForCausalLM"),
        "rope_parameters": {"full_attention": full, "sliding_attention": local},
        "rope_scaling": None,
    }


FAMILY = Family("gemma3", "Gemma3ForCausalLM", "gemma3_text", args_from_config, config_from_args)
