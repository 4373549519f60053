"""Llama-family models: build from a preset or ModelArgs, load and save Hugging Face folders."""

from __future__ import annotations

import torch

from trainer.models.config import PRESETS, ModelArgs, resolve_args
from trainer.models.hf import args_from_hf_config, load_state_dict, load_weights, read_hf_config, save_hf
from trainer.models.llama import KernelChoice, Transformer


def build(preset_or_args: str | ModelArgs, vocab_size: int | None = None, kernels: KernelChoice | None = None,
          seed: int | None = None) -> Transformer:
    """A randomly initialised model from a preset name (vocab from `vocab_size` if the preset has none)."""
    args = resolve_args(preset_or_args, vocab_size) if isinstance(preset_or_args, str) else preset_or_args
    if seed is not None:
        torch.manual_seed(seed)
    model = Transformer(args, kernels)
    model.init_weights()
    return model


def load_hf(path, kernels: KernelChoice | None = None) -> Transformer:
    """A model with the weights of a local Hugging Face folder."""
    args = args_from_hf_config(read_hf_config(path))
    with torch.device("meta"):
        model = Transformer(args, kernels)
    state = load_state_dict(path)
    model.to_empty(device="cpu")
    model.model.rotary_emb.reset_parameters()
    model.tie_weights()
    load_weights(model, state, str(path))
    return model


__all__ = ["PRESETS", "KernelChoice", "ModelArgs", "Transformer", "build", "load_hf", "save_hf"]
