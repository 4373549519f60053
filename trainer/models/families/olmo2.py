"""OLMo 2 (Olmo2ForCausalLM): RMSNorm after attention and after the MLP, on their outputs before
the residual add (no norm on the block's input), and an RMSNorm over the whole q and k projections."""

from trainer.models.families.family import Family, no_qkv_bias, refuse_biases


def args_from_config(cfg: dict) -> dict:
    refuse_biases(cfg, "Olmo2ForCausalLM")
    return {"qk_norm": "projection", "norm_placement": "post"}


def config_from_args(args) -> dict:
    no_qkv_bias(args, "Olmo2ForCausalLM")
    return {"attention_bias": False}


FAMILY = Family("olmo2", "Olmo2ForCausalLM", "olmo2", args_from_config, config_from_args)
