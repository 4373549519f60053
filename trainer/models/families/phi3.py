"""Phi-3 and Phi-4-mini (Phi3ForCausalLM): Llama's block with q, k and v in one qkv_proj and gate and
up in one gate_up_proj (kept fused here too, so checkpoints and PEFT's target names match), a
rotary embedding on part of each head (partial_rotary_factor), and sliding windows when set."""

from trainer.errors import CheckpointError
from trainer.models.families.family import Family, no_qkv_bias, silu_only


def args_from_config(cfg: dict) -> dict:
    activation = silu_only(cfg, "Phi3ForCausalLM")
    dropout = {k: cfg.get(k) for k in ("resid_pdrop", "embd_pdrop", "attention_dropout") if cfg.get(k)}
    if dropout:
        raise CheckpointError(f"Phi3ForCausalLM with dropout ({dropout}) is not supported; set them to 0.0")
    return {**activation, "fused_projections": True, "sliding_window": cfg.get("sliding_window")}


def config_from_args(args) -> dict:
    no_qkv_bias(args, "Phi3ForCausalLM")
    return {
        "hidden_act": "silu",
        "sliding_window": args.sliding_window,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attention_dropout": 0.0,
    }


FAMILY = Family("phi3", "Phi3ForCausalLM", "phi3", args_from_config, config_from_args)
