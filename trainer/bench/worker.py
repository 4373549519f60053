"""One side of `python -m trainer bench`, run in a process of its own so its peak memory is its own.

    python -m trainer.bench.worker SPEC.json

SPEC.json names the side ("reference", "optimized" or "peer"), its config file, the JSON file to
write the result to, and the bench options that concern one side (mask_last_label, profile_trace,
warmup_steps). The result holds facts only: per-step losses and seconds, input tokens per step,
peak memory, the device and the compute dtype, the model's shape and a checksum of its initial
weights. trainer/bench/report.py turns them into tokens/s, MFU and the verdict.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import sys
from pathlib import Path

import torch

from trainer.build import RunParts, build_run
from trainer.callbacks import TrainerCallback
from trainer.config import load_config
from trainer.constants import IGNORE_INDEX
from trainer.data import DataError
from trainer.errors import TrainerError
from trainer.loop import Trainer
from trainer.runtime import DTYPE_NAMES, resolve_device

PROFILED_STEPS = 3  # enough steady steps to see the pattern in a trace a browser still opens quickly


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


class ProfileSteps(TrainerCallback):
    """torch.profiler over PROFILED_STEPS steps after `first_step`, exported as a chrome trace."""

    def __init__(self, path: Path, device: torch.device, first_step: int):
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(activities=activities, record_shapes=True)
        self.path, self.first_step, self.running, self.done, self.steps_left = path, first_step, False, False, 0

    def on_step_begin(self, config, state, control, **kwargs):
        if not self.running and not self.done and state.step >= self.first_step:
            self.profiler.start()
            self.running, self.steps_left = True, PROFILED_STEPS

    def on_step_end(self, config, state, control, **kwargs):
        if self.running:
            self.profiler.step()
            self.steps_left -= 1
            if self.steps_left == 0:
                self.on_train_end(config, state, control)

    def on_train_end(self, config, state, control, **kwargs):
        if self.running:
            self.profiler.stop()
            self.profiler.export_chrome_trace(str(self.path))
            self.running, self.done = False, True


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


def run_ours(config, spec: dict) -> dict:
    parts = bench_parts(config, spec["mask_last_label"])
    facts = side_facts(parts)
    recorder = RecordSteps()
    callbacks = [recorder]
    trace = Path(spec["profile_trace"]) if spec.get("profile_trace") else None
    if trace is not None:
        callbacks.append(ProfileSteps(trace, parts.device, first_step=spec["warmup_steps"]))
    trainer = Trainer(parts.config, callbacks=callbacks, parts=parts)
    trainer.train()
    if trainer.stop_requested:
        raise KeyboardInterrupt
    return {
        **facts,
        "losses": recorder.losses,
        "step_seconds": recorder.seconds,
        "peak_mem_bytes": recorder.peak_mem_bytes,
        "profile_trace": str(trace) if trace else None,
    }


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result_path = Path(spec["result"])
    try:
        config = load_config(spec["config"])
        if spec["side"] == "peer":
            from trainer.bench.peers import run_hf_peer

            result = run_hf_peer(config, spec)
        else:
            result = run_ours(config, spec)
    except (TrainerError, DataError) as e:
        result_path.write_text(json.dumps({"error": str(e)}))
        return 2
    except KeyboardInterrupt:  # Ctrl-C reaches the parent too, which stops the bench
        return 130
    except torch.OutOfMemoryError as e:
        device = resolve_device(load_config(spec["config"]).train.device)
        hint = " (pass --bench.reference=none to skip the eager reference)" if spec["side"] == "reference" else ""
        result_path.write_text(json.dumps({"error": f"out of memory on {device}{hint}: {str(e).splitlines()[0]}"}))
        return 2
    result_path.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
