"""Mixtral (MixtralForCausalLM): Mistral's attention, and in every layer a mixture of SwiGLU experts
of width intermediate_size; the top-k router probabilities are always renormalised."""

from trainer.models.families import mistral
from trainer.models.families.family import ExpertLayout, Family, moe_args


def args_from_config(cfg: dict) -> dict:
    return {**mistral.args_from_config(cfg), **moe_args(cfg, "MixtralForCausalLM")}


def config_from_args(args) -> dict:
    return {
        **mistral.config_from_args(args),
        "num_local_experts": args.n_experts,
        "num_experts_per_tok": args.experts_per_token,
        "router_aux_loss_coef": args.router_aux_loss_coef,
        "router_jitter_noise": 0.0,
    }


FAMILY = Family(
    "mixtral",
    "MixtralForCausalLM",
    "mixtral",
    args_from_config,
    config_from_args,
    experts=ExpertLayout("block_sparse_moe", "w1", "w3", "w2"),
)
