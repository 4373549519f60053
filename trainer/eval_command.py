"""`python -m trainer eval CHECKPOINT_DIR`: loss and perplexity of a saved model on its run's validation split."""

from __future__ import annotations

import json
from pathlib import Path

from trainer.build import load_run_data
from trainer.config import load_config
from trainer.errors import CheckpointError, ConfigError
from trainer.evaluation import Evaluator
from trainer.files import require_folder
from trainer.lora import is_adapter_folder, load_adapter_model
from trainer.models import load_hf
from trainer.ops.dispatch import KernelChoice
from trainer.runtime import resolve_device, resolve_dtype


def evaluate_checkpoint(path: str | Path, overrides: list[str] = ()) -> dict:
    """Loss and perplexity of a checkpoint-<step> or final folder on its run's validation split."""
    path = require_folder(path, "eval:", "a run's final or checkpoint-<step> folder")
    if not (path / "run_config.toml").is_file():
        raise CheckpointError(
            f"{str(path)!r} is not a checkpoint folder (no run_config.toml); pass a "
            "checkpoint-<step> or final folder of a run"
        )
    cfg = load_config(path / "run_config.toml", list(overrides))
    device = resolve_device(cfg.train.device)
    compute_dtype = resolve_dtype(cfg.train.dtype, device)
    kernels = KernelChoice.from_config(cfg.kernels)
    if is_adapter_folder(path):  # a LoRA run's final/ or checkpoint: its base model plus the adapters
        model = load_adapter_model(
            path,
            kernels,
            quantize=cfg.lora.quantize,
            compute_dtype=compute_dtype,
            device=device,
            fsdp=cfg.parallel.strategy == "fsdp",
        )
    else:
        model = load_hf(path, kernels).to(device)
    data = load_run_data(cfg, tokenizer=str(path))
    if data.val is None:
        raise ConfigError(
            f"the run's data ({cfg.data.path}) has no validation split: with "
            f"data.val_fraction={cfg.data.val_fraction} no document fell into it; pass "
            "--data.val_fraction=<a larger fraction> or --data.path=<held-out text>"
        )
    metrics = Evaluator.for_run(cfg, data.val, device, compute_dtype)(model)
    state_file = path / "trainer_state.json"
    step = json.loads(state_file.read_text())["trainer"]["step"] if state_file.is_file() else None
    return {"step": step, **metrics}
