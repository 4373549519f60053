"""Qwen3-MoE (Qwen3MoeForCausalLM): Qwen3's attention (q/k norms per head), and a mixture of SwiGLU
experts of width moe_intermediate_size in the layers decoder_sparse_step and mlp_only_layers
choose (the rest keep a dense MLP of width intermediate_size); norm_topk_prob says whether the
top-k router probabilities are renormalised, and they are rounded to the logits' dtype."""

from trainer.models.families import qwen3
from trainer.models.families.family import ExpertLayout, Family, moe_args, n_experts


def args_from_config(cfg: dict) -> dict:
    n, step = cfg["num_hidden_layers"], cfg.get("decoder_sparse_step", 1)
    only_mlp = set(cfg.get("mlp_only_layers") or [])
    dense = tuple(i for i in range(n) if i in only_mlp or n_experts(cfg) == 0 or (i + 1) % step)
    return {
        **qwen3.args_from_config(cfg),
        **moe_args(cfg, "Qwen3MoeForCausalLM"),
        "moe_intermediate_size": cfg["moe_intermediate_size"],
        "dense_layers": dense,
        "moe_norm_topk": bool(cfg.get("norm_topk_prob", False)),
        "router_round_weights": True,
    }


def config_from_args(args) -> dict:
    return {
        **qwen3.config_from_args(args),
        "num_experts": args.n_experts,  # transformers 4's name, and 5's
        "num_local_experts": args.n_experts,
        "num_experts_per_tok": args.experts_per_token,
        "moe_intermediate_size": args.expert_intermediate_size,
        "decoder_sparse_step": 1,
        "mlp_only_layers": list(args.dense_layers),
        "norm_topk_prob": args.moe_norm_topk,
        "router_aux_loss_coef": args.router_aux_loss_coef,
    }


FAMILY = Family(
    "qwen3_moe",
    "Qwen3MoeForCausalLM",
    "qwen3_moe",
    args_from_config,
    config_from_args,
    experts=ExpertLayout("mlp", "gate_proj", "up_proj", "down_proj"),
)
