"""What both kinds of bench side share: the run's parts as bench builds them, the facts each side
reports (device, dtype, model shape, a checksum of the initial weights) and its per-step record.

Our sides run in trainer/bench/worker.py, the Hugging Face peer in trainer/bench/peers.py.
"""

from __future__ import annotations

import importlib.metadata
import platform
from pathlib import Path

import torch

from trainer.build import RunParts, build_run
from trainer.callbacks import TrainerCallback
from trainer.constants import IGNORE_INDEX
from trainer.runtime import DTYPE_NAMES


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()}"


def weights_checksum(model: torch.nn.Module) -> list[float]:
    """Sum and sum of squares of every parameter rounded to bf16, in float64, in name order.

    Rounded to bf16 first, so sides whose parameters are fp32 and bf16 copies of the same
    initialisation (train.param_dtype) agree exactly.
    """
    total = torch.zeros(2, dtype=torch.float64)
    for _, p in sorted(model.named_parameters()):
        values = p.detach().to(torch.bfloat16).double()
        total += torch.stack([values.sum(), values.square().sum()]).cpu()
    return total.tolist()


class IgnoreLastLabel:
    """A BlockLoader whose blocks have their last label ignored.

    A Hugging Face model shifts labels inside itself and makes seq_len-1 predictions from the same
    input_ids; with the last label ignored our sides score exactly those predictions.
    """

    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def next_step(self) -> list[dict]:
        micro_batches = self.loader.next_step()
        for mb in micro_batches:
            mb["labels"] = mb["labels"].clone()
            mb["labels"][:, -1] = IGNORE_INDEX
        return micro_batches


class RecordSteps(TrainerCallback):
    """Each optimizer step's loss and seconds, from the loop's own log (bench reads back every step)."""

    def __init__(self):
        self.losses: list[float] = []
        self.seconds: list[float] = []
        self.peak_mem_bytes = 0

    def on_log(self, config, state, control, logs=None, **kwargs):
        t = config.train
        step_tokens = t.micro_batch_size * t.grad_accum_steps * t.seq_len
        self.losses.append(logs["loss"])
        self.seconds.append(step_tokens / logs["tokens_per_s"])
        self.peak_mem_bytes = max(self.peak_mem_bytes, logs["peak_mem_bytes"])


def bench_parts(config, mask_last_label: bool) -> RunParts:
    """The run's parts as `train` builds them, minus evaluation and checkpoints: bench times training steps."""
    parts = build_run(config)
    parts.evaluator = parts.checkpointer = None
    if mask_last_label:
        parts.loader = IgnoreLastLabel(parts.loader)
    return parts


def model_shape(args) -> dict:
    return {
        "n_params": args.num_params(),
        "vocab_size": args.vocab_size,
        "hidden_size": args.hidden_size,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "head_dim": args.head_dim,
        "tie_embeddings": args.tie_embeddings,
    }


def side_facts(parts: RunParts) -> dict:
    t = parts.config.train
    return {
        "device": device_name(parts.device),
        "device_type": parts.device.type,
        "dtype": DTYPE_NAMES[parts.compute_dtype],
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "tokens_per_step": t.micro_batch_size * t.grad_accum_steps * t.seq_len,
        "seq_len": t.seq_len,
        "model": model_shape(parts.model.args),
        "initial_checksum": weights_checksum(parts.model),
        "torch": torch.__version__,
        "triton": package_version("triton"),
    }
