"""Qwen2 and Qwen2.5 (Qwen2ForCausalLM): Llama's block with biases on q, k and v; sliding windows
in the layers from max_window_layers on when use_sliding_window is set."""

from trainer.models.families.family import Family, silu_only, sliding_layers


def args_from_config(cfg: dict) -> dict:
    activation = silu_only(cfg, "Qwen2ForCausalLM")
    return {**activation, "qkv_bias": True, **sliding_layers(cfg, cfg.get("max_window_layers", 28))}


def config_from_args(args) -> dict:
    return {"hidden_act": "silu", **window_config(args)}


def window_config(args) -> dict:
    """use_sliding_window / sliding_window / layer_types as Qwen2 and Qwen3 write them."""
    config = {"use_sliding_window": args.sliding_window is not None, "sliding_window": args.sliding_window}
    if args.sliding_window is not None:
        config["layer_types"] = list(args.layer_types or ["sliding_attention"] * args.n_layers)
    return config


FAMILY = Family("qwen2", "Qwen2ForCausalLM", "qwen2", args_from_config, config_from_args)
