"""Llama 2, 3 and 3.1-3.3 (LlamaForCausalLM): the plain pre-norm decoder; RoPE scaling is shared (hf.py)."""

from trainer.models.families.family import Family, no_qkv_bias, refuse_biases, silu_only


def args_from_config(cfg: dict) -> dict:
    activation = silu_only(cfg, "LlamaForCausalLM")
    refuse_biases(cfg, "LlamaForCausalLM")
    return activation


def config_from_args(args) -> dict:
    no_qkv_bias(args, "LlamaForCausalLM")
    return {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}


FAMILY = Family("llama", "LlamaForCausalLM", "llama", args_from_config, config_from_args)
