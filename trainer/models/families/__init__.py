"""The model families: which Hugging Face classes the trainer loads from and saves to, and how
each one's config.json maps onto ModelArgs.

A family is one file here with one `FAMILY`, and one entry in FAMILIES below. What every family
shares (vocabulary, widths, heads, RoPE, norms' eps, tied embeddings) is mapped in
trainer/models/hf.py; a family's file maps only what is its own (biases, q/k norms, norm placement,
sliding windows) and refuses, in one line, a config feature the trainer does not implement.
tests/test_hf.py checks each family against transformers' own model.
"""

from __future__ import annotations

from trainer.errors import CheckpointError
from trainer.models.families import gemma2, gemma3, llama, mistral, mixtral, olmo2, phi3, qwen2, qwen3, qwen3_moe
from trainer.models.families.family import Family

FAMILIES: tuple[Family, ...] = (
    llama.FAMILY,
    mistral.FAMILY,
    qwen2.FAMILY,
    qwen3.FAMILY,
    phi3.FAMILY,
    olmo2.FAMILY,
    gemma2.FAMILY,
    gemma3.FAMILY,
    mixtral.FAMILY,
    qwen3_moe.FAMILY,
)
BY_ARCHITECTURE = {f.architecture: f for f in FAMILIES}
BY_NAME = {f.name: f for f in FAMILIES}


def family_of_config(cfg: dict) -> Family:
    """The family of a config.json, refused with the supported list when it is not one of ours."""
    archs = cfg.get("architectures")
    if archs:
        arch = archs[0]
    else:  # a config saved without a model (PretrainedConfig.save_pretrained) names only its model_type
        by_type = {f.model_type: f.architecture for f in FAMILIES}
        arch = by_type.get(cfg.get("model_type"), cfg.get("model_type") or "unknown")
    if arch not in BY_ARCHITECTURE:
        raise CheckpointError(f"architecture {arch!r} is not supported; supported: {', '.join(BY_ARCHITECTURE)}")
    return BY_ARCHITECTURE[arch]
