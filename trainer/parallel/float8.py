"""float8 training through torchao (train.float8=tensorwise|rowwise): the decoder's linear layers
compute their three matmuls (output, input gradient, weight gradient) in float8 with dynamic
scales, one per tensor or one per row. torchao does it better than code we would write: its
Float8Linear is what torchtitan uses, composes with FSDP2 (float8 all-gather under tensorwise
scaling) and torch.compile, and is kept in step with the GPUs' float8 GEMMs.

What stays in bf16: the output head (the fused loss reads its weight directly), the embeddings,
the norms, the MoE router and experts (not nn.Linear), LoRA's adapters, and any linear whose
widths are not multiples of 16 (float8 GEMMs need them). float8 GEMMs need compute capability 8.9
or newer (L4, RTX 4090, H100, B200); elsewhere the setting is refused before the run starts.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.errors import ConfigError

RECIPES = ("tensorwise", "rowwise")
MIN_CAPABILITY = (8, 9)  # the first GPUs with float8 tensor cores (Ada, then Hopper)


def check_float8(recipe: str, device: torch.device, lora_rank: int) -> None:
    """One line naming why train.float8 cannot run here, before anything is loaded."""
    if recipe == "none":
        return
    if lora_rank > 0:
        raise ConfigError(
            f"train.float8={recipe} with lora.rank={lora_rank} is not supported (the frozen base "
            "would need float8 weights of its own); set train.float8=none for LoRA"
        )
    if device.type != "cuda":
        raise ConfigError(
            f"train.float8={recipe} needs a CUDA GPU of compute capability 8.9 or newer (L4, RTX 4090, "
            f"H100); this run is on {device.type}; set train.float8=none"
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise ConfigError(
            f"train.float8={recipe} needs compute capability 8.9 or newer; "
            f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}; set train.float8=none"
        )
    _torchao()


def _torchao():
    try:
        import torchao.float8 as float8
    except ImportError:
        raise ConfigError("train.float8 needs the torchao package: pip install torchao") from None
    return float8


def float8_eligible(module: nn.Module, name: str) -> bool:
    """The linear layers that train in float8: the decoder's, with widths float8 GEMMs take."""
    return (
        isinstance(module, nn.Linear)
        and name != "lm_head"
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def apply_float8(model: nn.Module, recipe: str, *, fsdp: bool, emulate: bool = False) -> list[str]:
    """Swaps the eligible linear layers for torchao's Float8Linear in place; returns their names.
    fsdp: all-gather the weights in float8 (tensorwise scaling only, as torchao allows). emulate:
    torchao's emulation (float8 casts, matmuls in high precision), for tests on a CPU."""
    float8 = _torchao()
    config = float8.Float8LinearConfig.from_recipe_name(recipe)
    if recipe == "tensorwise" and fsdp:
        config = float8.Float8LinearConfig(enable_fsdp_float8_all_gather=True, emulate=emulate)
    elif emulate:
        config = _emulated(config)
    converted = [name for name, module in model.named_modules() if float8_eligible(module, name)]
    float8.convert_to_float8_training(model, config=config, module_filter_fn=float8_eligible)
    return converted


def _emulated(config):
    import dataclasses

    return dataclasses.replace(config, emulate=True)
