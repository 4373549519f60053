"""Llama 2, 3 and 3.1-3.3 (LlamaForCausalLM): the plain pre-norm decoder; RoPE scaling is shared (hf.py)."""

from trainer.models.families.family import Family, no_qkv_bias, refuse_biases


def args_from_config(cfg: dict) -> dict:
    refuse_biases(cfg, "LlamaForCausalLM")
    return {}


def config_from_args(args) -> dict:
    no_qkv_bias(args, "LlamaForCausalLM")
    return {"attention_bias": False, "mlp_bias": False}


FAMILY = Family("llama", "LlamaForCausalLM", "llama", args_from_config, config_from_args)
