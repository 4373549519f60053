"""Optimizer and learning-rate schedule factory.

`optim.name` is `[galore_]<base>[_layerwise]`:
- base `adamw`: torch's fused AdamW (CUDA and CPU); `adamw8bit` and
  `paged_adamw8bit`: bitsandbytes' blockwise 8-bit AdamW (paged: states in CUDA unified memory,
  evicted to the host under pressure; on CPU bitsandbytes falls back to plain states, with a
  warning); `adafactor` (as `galore_adafactor` only): galore-torch's Adafactor, with
  relative_step, scale_parameter and warmup_init off, so `optim.lr` and its schedule drive it and
  `optim.betas[0]` is its momentum (0 turns momentum off; Adafactor's own second-moment decay and
  eps replace `optim.betas[1]` and `optim.eps`).
- `galore_`: the attention and MLP matrices are trained in a low-rank subspace (galore.py).
- `apollo_adamw`: AdamW whose attention and MLP matrices keep moments only of a randomly projected
  gradient and are moved by the raw gradient scaled per row (apollo.py).
- `_layerwise`: each parameter is updated inside backward and its gradient freed (layerwise.py).
"""

from __future__ import annotations

import importlib
import re
import warnings

import torch
from torch import nn

from trainer.errors import ConfigError, TrainerError
from trainer.optim.apollo import APOLLO_KEYS, Apollo
from trainer.optim.galore import GaLore
from trainer.optim.layerwise import LayerwiseOptimizer
from trainer.optim.schedule import build_scheduler, lr_factor
from trainer.optim.state import optimizer_state_tensors, state_bytes

BASES = ("adamw", "adamw8bit", "paged_adamw8bit")
GALORE_BASES = ("adamw", "adamw8bit", "adafactor")
GALORE_KEYS = ("galore_rank", "galore_update_proj_gap", "galore_scale", "galore_proj_type")
APOLLO = "apollo_adamw"  # a base of its own: it scales the targeted matrices' updates itself


def optimizer_names() -> list[str]:
    """Every valid `optim.name`."""
    names = list(BASES) + [f"galore_{base}" for base in GALORE_BASES] + [APOLLO]
    return names + [f"{name}_layerwise" for name in names]


def parse_name(name: str) -> tuple[str, bool, bool]:
    """`optim.name` -> (base optimizer, GaLore?, layer-wise?); APOLLO's base is `apollo_adamw`."""
    if name not in optimizer_names():
        raise ConfigError(f"optim.name={name!r} is unknown; choose one of: {', '.join(optimizer_names())}")
    layerwise = name.endswith("_layerwise")
    name = name.removesuffix("_layerwise")
    return name.removeprefix("galore_"), name.startswith("galore_"), layerwise


def param_groups(
    model: nn.Module, weight_decay: float, target: str | None = None, settings: dict | None = None
) -> list[dict]:
    """Weight decay on matrices only: norms, biases and embeddings are not decayed.

    With `target` (a regex), the decayed weights of the nn.Linear modules whose name it matches form
    a third group carrying `settings` (the optim.galore_* or optim.apollo_* values).
    Frozen parameters (requires_grad=False, as under LoRA) are left out.
    """
    decay, no_decay, projected, seen = [], [], [], set()
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    targeted = set()
    if target is not None:
        pattern = re.compile(target)
        targeted = {
            id(m.weight) for name, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.search(name)
        }
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() < 2 or id(p) in embeddings:
            no_decay.append(p)
        else:
            (projected if id(p) in targeted else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if target is not None:
        groups.append({"params": projected, "weight_decay": weight_decay, **(settings or {})})
    return groups


def base_optimizer(base: str, groups: list[dict], cfg, seeds: dict | None = None) -> torch.optim.Optimizer:
    """The optimizer named `base` over `groups`; every argument passed by name. `seeds`: APOLLO's
    projection seed of each parameter, numbered over the whole model (the same in layer-wise mode)."""
    if base == "adamw":
        # The fused kernel (CUDA and CPU) updates every parameter in one launch, and skips the whole
        # update on the device when the loop sets `found_inf`, so a step needs no host sync.
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=0.0, fused=True)
    if base in ("adamw8bit", "paged_adamw8bit"):
        bnb = _import_optional("bitsandbytes", cfg.name)
        return bnb.optim.AdamW8bit(
            groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=0.0, is_paged=base == "paged_adamw8bit"
        )
    if base == "adafactor":
        # Without a `rank` key in a group, galore-torch's Adafactor is plain Adafactor.
        galore_torch = _import_optional("galore_torch", cfg.name)
        return galore_torch.GaLoreAdafactor(
            groups,
            lr=cfg.lr,
            beta1=cfg.betas[0] or None,
            weight_decay=0.0,
            relative_step=False,
            scale_parameter=False,
            warmup_init=False,
        )
    if base == APOLLO:
        return Apollo(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, seeds=seeds)
    raise ConfigError(f"unknown base optimizer {base!r}")


def _import_optional(module: str, optimizer_name: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.replace("_", "-")
        raise ConfigError(f"optim.name={optimizer_name} needs the {package} package: pip install {package}") from None


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """The optimizer `cfg.name` names (see the module docstring), over `model`'s parameters."""
    base, galore, layerwise = parse_name(cfg.name)
    prefix = "galore" if galore else "apollo" if base == APOLLO else None
    if prefix:
        target = getattr(cfg, f"{prefix}_target")
        keys = GALORE_KEYS if galore else APOLLO_KEYS
        groups = param_groups(model, cfg.weight_decay, target, {key: getattr(cfg, key) for key in keys})
        _check_targets(model, groups[-1]["params"], prefix, target, getattr(cfg, f"{prefix}_rank"))
    else:
        groups = param_groups(model, cfg.weight_decay)
    # Drop empty groups (e.g. no undecayed matrix is left outside GaLore), and start each at the peak lr.
    groups = [{**group, "lr": cfg.lr} for group in groups if group["params"]]
    seeds = {p: index for index, p in enumerate((p for group in groups for p in group["params"]), start=1)}

    def make(groups: list[dict]) -> torch.optim.Optimizer:
        if galore:
            return GaLore(groups, lambda inner_groups: base_optimizer(base, inner_groups, cfg))
        return base_optimizer(base, groups, cfg, seeds)

    return LayerwiseOptimizer(groups, make) if layerwise else make(groups)


def _check_targets(model: nn.Module, targeted: list[torch.Tensor], prefix: str, target: str, rank: int) -> None:
    """Refuses a target regex that matches nothing; warns when the rank is clamped to a small matrix."""
    if not targeted:
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:3]
        raise ConfigError(
            f"optim.{prefix}_target={target!r} matches no linear layer of this model; "
            f"write a regex over module names such as {', '.join(names)}"
        )
    clamped = sorted({tuple(p.shape) for p in targeted if min(p.shape) < rank})
    if clamped:
        warnings.warn(
            f"optim.{prefix}_rank={rank} is larger than some matrices allow; their rank is "
            f"clamped to min(rows, cols) (shapes {', '.join(map(str, clamped))})",
            stacklevel=3,
        )


__all__ = [
    "Apollo",
    "GaLore",
    "LayerwiseOptimizer",
    "build_optimizer",
    "build_scheduler",
    "lr_factor",
    "optimizer_names",
    "optimizer_state_tensors",
    "param_groups",
    "parse_name",
    "state_bytes",
]


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """True for torch's fused Adam/AdamW, which skip the whole update when `optimizer.found_inf` is 1."""
    fused = [group.get("fused") for group in optimizer.param_groups]
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and all(fused)


def nonfinite_after_update(step: int, name: str, last_good) -> TrainerError:
    """The error for a non-finite step of an optimizer that updated during backward (layer-wise):
    the update cannot be skipped any more. `last_good`: the newest checkpoint, or None."""
    return TrainerError(
        f"step {step}: non-finite loss or gradient with optim.name={name}, whose updates already happened "
        "during backward, so the step cannot be skipped and the weights may be damaged; stopped without "
        f"saving. Resume from the last good checkpoint ({last_good or 'none'}) with a lower "
        "optim.lr or train.dtype=fp32"
    )
