"""Llama-family models: build from a preset or ModelArgs, load and save Hugging Face folders."""

from __future__ import annotations

import torch

from trainer.models.config import PRESETS, ModelArgs, resolve_args
from trainer.models.hf import args_from_hf_config, assign_weights, read_generation_config, read_hf_config, save_hf
from trainer.models.llama import Transformer
from trainer.ops.dispatch import KernelChoice


def build(
    preset_or_args: str | ModelArgs,
    vocab_size: int | None = None,
    kernels: KernelChoice | None = None,
    seed: int | None = None,
) -> Transformer:
    """A randomly initialised model from a preset name (vocab from `vocab_size` if the preset has none)."""
    args = resolve_args(preset_or_args, vocab_size) if isinstance(preset_or_args, str) else preset_or_args
    if seed is not None:  # what follows (LoRA's adapters, dropout) draws from the global generator
        torch.manual_seed(seed)
    model = Transformer(args, kernels)
    model.init_weights(seed=seed or 0)
    return model


def load_hf(path, kernels: KernelChoice | None = None) -> Transformer:
    """A model with the weights of a local Hugging Face folder, on the CPU in the checkpoint's dtype.

    Built on the meta device (no memory) and filled tensor by tensor, so the weights are held
    once. The source config.json and generation_config.json ride along as `model.hf_config` and
    `model.hf_generation_config`, so save_hf keeps their extra keys.
    """
    model = empty_hf(path, kernels)
    assign_weights(model, path)
    model.materialize_rotary("cpu")
    model.tie_weights()
    return model


def empty_hf(path, kernels: KernelChoice | None = None) -> Transformer:
    """The model of a Hugging Face folder on the meta device (no weights, no memory), with the folder's
    config.json and generation_config.json attached as load_hf attaches them."""
    config = read_hf_config(path)
    with torch.device("meta"):
        model = Transformer(args_from_hf_config(config), kernels)
    model.hf_config = config
    model.hf_generation_config = read_generation_config(path)
    return model


__all__ = ["PRESETS", "KernelChoice", "ModelArgs", "Transformer", "build", "empty_hf", "load_hf", "save_hf"]
