"""Mistral (MistralForCausalLM): Llama's block with sliding-window attention in every layer."""

from trainer.errors import CheckpointError
from trainer.models.families.family import Family, no_qkv_bias, refuse_biases, silu_only


def args_from_config(cfg: dict) -> dict:
    activation = silu_only(cfg, "MistralForCausalLM")
    refuse_biases(cfg, "MistralForCausalLM")
    if cfg.get("layer_types"):  # transformers says such checkpoints are Ministral's
        raise CheckpointError("MistralForCausalLM with layer_types (alternating attention) is not supported")
    return {**activation, "sliding_window": cfg.get("sliding_window")}


def config_from_args(args) -> dict:
    no_qkv_bias(args, "MistralForCausalLM")
    return {"hidden_act": "silu", "sliding_window": args.sliding_window}


FAMILY = Family("mistral", "MistralForCausalLM", "mistral", args_from_config, config_from_args)
