"""Hugging Face checkpoint folders: config.json + safetensors (single file or sharded with an index)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trainer.errors import CheckpointError
from trainer.models.config import ModelArgs

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                           "Qwen2ForCausalLM": "qwen2"}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def args_from_hf_config(cfg: dict) -> ModelArgs:
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if arch == "LlamaForCausalLM" and cfg.get("attention_bias"):
        raise CheckpointError("Llama checkpoints with attention_bias=true (a bias on o_proj too) are not supported")
    n_heads = cfg["num_attention_heads"]
    return ModelArgs(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        n_layers=cfg["num_hidden_layers"], n_heads=n_heads, n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
        max_seq_len=cfg.get("max_position_embeddings", 2048), rope_theta=float(cfg.get("rope_theta", 10000.0)),
        norm_eps=cfg.get("rms_norm_eps", 1e-6), tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=arch == "Qwen2ForCausalLM")


def hf_config_from_args(args: ModelArgs, dtype: torch.dtype = torch.float32) -> dict:
    arch = "Qwen2ForCausalLM" if args.qkv_bias else "LlamaForCausalLM"
    return {
        "architectures": [arch], "model_type": SUPPORTED_ARCHITECTURES[arch], "vocab_size": args.vocab_size,
        "hidden_size": args.hidden_size, "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim, "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len, "rope_theta": args.rope_theta, "rms_norm_eps": args.norm_eps,
        "tie_word_embeddings": args.tie_embeddings, "attention_bias": False, "torch_dtype": _DTYPE_NAMES[dtype],
    }


def save_hf(model, path: str | Path) -> None:
    """Writes config.json and model.safetensors in the layout `transformers` loads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.args.tie_embeddings:
        state.pop("lm_head.weight", None)  # transformers re-ties it from the embedding
    dtype = next(iter(state.values())).dtype
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf_config_from_args(model.args, dtype), indent=2) + "\n")


def read_hf_config(path: str | Path) -> dict:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{str(path)!r} has no config.json: expected a Hugging Face model folder")
    return json.loads(file.read_text())


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(str(path / shard)))
        return state
    single = path / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{str(path)!r} holds no model.safetensors (nor a sharded index)")
    return load_file(str(single))


def load_weights(model, state: dict[str, torch.Tensor], source: str) -> None:
    """Copies `state` into `model`, refusing a checkpoint of another shape with the mismatch named."""
    own = model.state_dict()
    if model.args.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
        own.pop("lm_head.weight", None)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {source} does not fit this model: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    for name, tensor in state.items():
        if tensor.shape != own[name].shape:
            raise CheckpointError(f"checkpoint {source} does not fit this model: {name} is "
                                  f"{tuple(tensor.shape)} there but {tuple(own[name].shape)} here")
    model.load_state_dict(state, strict=False)
