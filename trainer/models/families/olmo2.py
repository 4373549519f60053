"""OLMo 2 (Olmo2ForCausalLM): RMSNorm after attention and after the MLP, on their outputs before
the residual add (no norm on the block's input), and an RMSNorm over the whole q and k projections."""

from trainer.models.families.family import Family, no_qkv_bias, refuse_biases, silu_only


def args_from_config(cfg: dict) -> dict:
    activation = silu_only(cfg, "Olmo2ForCausalLM")
    refuse_biases(cfg, "Olmo2ForCausalLM")
    # Olmo2RMSNorm multiplies by its weight in fp32 and rounds last, as Gemma's does.
    return {**activation, "qk_norm": "projection", "norm_placement": "post", "norm_cast": "gemma"}


def config_from_args(args) -> dict:
    no_qkv_bias(args, "Olmo2ForCausalLM")
    return {"hidden_act": "silu", "attention_bias": False}


FAMILY = Family("olmo2", "Olmo2ForCausalLM", "olmo2", args_from_config, config_from_args)
