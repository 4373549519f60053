"""Qwen3 (Qwen3ForCausalLM): Llama's block with an RMSNorm over each head's q and k before RoPE;
sliding windows as Qwen2."""

from trainer.models.families.family import Family, no_qkv_bias, refuse_biases, silu_only, sliding_layers
from trainer.models.families.qwen2 import window_config


def args_from_config(cfg: dict) -> dict:
    activation = silu_only(cfg, "Qwen3ForCausalLM")
    refuse_biases(cfg, "Qwen3ForCausalLM")  # attention_bias puts one on o_proj too, which we lack
    return {**activation, "qk_norm": "head", **sliding_layers(cfg, cfg.get("max_window_layers", 28))}


def config_from_args(args) -> dict:
    no_qkv_bias(args, "Qwen3ForCausalLM")
    return {"hidden_act": "silu", "attention_bias": False, **window_config(args)}


FAMILY = Family("qwen3", "Qwen3ForCausalLM", "qwen3", args_from_config, config_from_args)
