"""One side of `python -m trainer bench`, run in a process of its own so its peak memory is its own.

    python -m trainer.bench_worker SPEC.json

SPEC.json names the side ("reference", "optimized" or "peer"), its config file, the JSON file to write
the result to, and the bench options that concern one side (mask_last_label, profile_trace,
warmup_steps). The result holds facts only: per-step losses and seconds, input tokens per step, peak
memory, the device and the compute dtype, the model's shape and a checksum of its initial weights.
trainer/bench.py turns them into tokens/s, MFU and the verdict.

Test hook: the environment variable TRAINER_BENCH_SCALE_OPTIMIZED_LOSS=<factor> multiplies the
optimized side's loss by <factor> (the reference and the peer ignore it), so a test can break the
optimized path on purpose and check that bench fails.
"""

from __future__ import annotations

import copy
import gc
import importlib.metadata
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from trainer.config import load_config
from trainer.data import DataError
from trainer.errors import TrainerError
from trainer.callbacks import TrainerCallback
from trainer.loop import DTYPES, IGNORE_INDEX, Trainer, peak_memory_bytes, resolve_device
from trainer.models import save_hf

LOSS_SCALE_HOOK = "TRAINER_BENCH_SCALE_OPTIMIZED_LOSS"
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
    """Sum and sum of squares of every parameter in float64, in name order: equal for equal weights."""
    total = torch.zeros(2, dtype=torch.float64)
    for _, p in sorted(model.named_parameters()):
        values = p.detach().double()
        total += torch.stack([values.sum(), values.square().sum()]).cpu()
    return total.tolist()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


class StepProfiler:
    """torch.profiler over the first PROFILED_STEPS steps after warm-up, exported as a chrome trace."""

    def __init__(self, path: Path, device: torch.device, first_step: int):
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(activities=activities, record_shapes=True)
        self.path, self.first_step, self.running, self.done = path, first_step, False, False

    def before_step(self, step: int) -> None:
        """`step` is the number of steps already done."""
        if not self.running and not self.done and step >= self.first_step:
            self.profiler.start()
            self.running = True
            self.steps_left = PROFILED_STEPS

    def after_step(self) -> None:
        if self.running:
            self.profiler.step()
            self.steps_left -= 1
            if self.steps_left == 0:
                self.stop()

    def stop(self) -> None:
        if self.running:
            self.profiler.stop()
            self.profiler.export_chrome_trace(str(self.path))
            self.running, self.done = False, True


class BenchTrainer(Trainer):
    """The loop exactly as `train` runs it, minus evaluation and checkpoints: bench times training steps."""

    def __init__(self, config, callbacks=(), *, mask_last_label: bool = False, loss_scale: float = 1.0,
                 profile_trace: Path | None = None, profile_from_step: int = 0):
        super().__init__(config, callbacks)
        self.mask_last_label, self.loss_scale = mask_last_label, loss_scale
        self.profile_trace, self.profile_from_step = profile_trace, profile_from_step
        self.profiler: StepProfiler | None = None
        self.steps: list[dict] = []
        self.initial_checksum: list[float] | None = None

    def _build_model(self, tokenizer_vocab: int):
        model = super()._build_model(tokenizer_vocab)
        # Taken before the cast to train.param_dtype, so sides with different param dtypes compare too.
        self.initial_checksum = weights_checksum(model)
        return model

    def _setup(self):
        super()._setup()
        if self.mask_last_label:
            self.loader = IgnoreLastLabel(self.loader)
        if self.loss_scale != 1.0:
            forward = self.model.forward
            self.model.forward = lambda *args, **kwargs: forward(*args, **kwargs) * self.loss_scale
        if self.profile_trace is not None:
            self.profiler = StepProfiler(self.profile_trace, self.device, self.profile_from_step)

    def train_step(self, micro_batches):
        if self.profiler is not None:
            self.profiler.before_step(self.state.step)
        result = super().train_step(micro_batches)
        if self.profiler is not None:
            self.profiler.after_step()
        return result

    def evaluate(self):
        return None

    def _save(self):
        return None

    def _finish(self, *args, **kwargs):
        if self.profiler is not None:
            self.profiler.stop()


class RecordSteps(TrainerCallback):
    """Keeps each optimizer step's loss and seconds from the loop's own metrics."""

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


def model_shape(args) -> dict:
    return {"n_params": args.num_params(), "vocab_size": args.vocab_size, "hidden_size": args.hidden_size,
            "n_layers": args.n_layers, "n_heads": args.n_heads, "head_dim": args.head_dim,
            "tie_embeddings": args.tie_embeddings}


def side_facts(trainer: Trainer) -> dict:
    t = trainer.config.train
    return {
        "device": device_name(trainer.device), "device_type": trainer.device.type,
        "dtype": next(name for name, dtype in DTYPES.items() if dtype == trainer.amp_dtype),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "tokens_per_step": t.micro_batch_size * t.grad_accum_steps * t.seq_len, "seq_len": t.seq_len,
        "model": model_shape(trainer.model.args),
        "torch": torch.__version__, "triton": package_version("triton"),
    }


def run_ours(config, spec: dict) -> dict:
    scale = float(os.environ.get(LOSS_SCALE_HOOK, "1")) if spec["side"] == "optimized" else 1.0
    trace = Path(spec["profile_trace"]) if spec.get("profile_trace") else None
    recorder = RecordSteps()
    trainer = BenchTrainer(config, callbacks=[recorder], mask_last_label=spec["mask_last_label"], loss_scale=scale,
                           profile_trace=trace, profile_from_step=spec["warmup_steps"])
    trainer.train()
    if trainer.stop_requested:
        raise KeyboardInterrupt
    return {**side_facts(trainer), "losses": recorder.losses, "step_seconds": recorder.seconds,
            "peak_mem_bytes": recorder.peak_mem_bytes, "initial_checksum": trainer.initial_checksum,
            "profile_trace": str(trace) if trace else None}


def run_hf_peer(config, spec: dict) -> dict:
    """transformers.Trainer + LlamaForCausalLM on our initial weights and our batches, in order.

    The weights come from the same BenchTrainer setup as our sides (same seed, same data, so the same
    initialisation, checked by checksum) through save_hf. The batches are ours with DESIGN.md's label
    conversion: input_ids = labels = block[:-1]; the model shifts them itself. The optimizer and LR
    schedule are built by trainer.optim: AdamW whatever optim.name says (8-bit, GaLore and layer-wise
    updates are this trainer's), with the same parameter groups as ours.
    """
    from transformers import AutoModelForCausalLM, PrinterCallback, TrainerCallback, TrainingArguments
    from transformers import Trainer as HFTrainer

    from trainer.optim import build_optimizer, build_scheduler

    use_liger = spec["peer"] == "hf-liger"
    config = copy.deepcopy(config)
    config.optim.name = "adamw"
    t = config.train
    ours = BenchTrainer(config)
    ours._setup()
    ours.metrics.close()
    facts, checksum = side_facts(ours), ours.initial_checksum
    facts["transformers"] = package_version("transformers")
    if use_liger:
        facts["liger_kernel"] = package_version("liger-kernel")
    samples = []
    for _ in range(t.max_steps):
        for mb in ours.loader.next_step():
            samples += [{"input_ids": row, "labels": row} for row in mb["input_ids"]]
    weights_dir = Path(t.output_dir) / "initial_weights"
    save_hf(ours.model, weights_dir)
    device, amp_dtype, param_dtype = ours.device, ours.amp_dtype, next(ours.model.parameters()).dtype
    del ours
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    model, loading = AutoModelForCausalLM.from_pretrained(weights_dir, dtype=param_dtype, attn_implementation="sdpa",
                                                          output_loading_info=True)
    if loading["missing_keys"] or loading["unexpected_keys"] or loading["mismatched_keys"]:
        raise TrainerError(f"transformers did not load every weight of {weights_dir}: {loading}")
    model.to(device)
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.optim, t.max_steps)

    class RecordHFSteps(TrainerCallback):
        """Per-step loss from the Trainer's own log, seconds between synchronised step ends."""

        def __init__(self):
            self.losses, self.seconds = [], []

        def on_train_begin(self, args, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            synchronize(device)
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            synchronize(device)
            now = time.perf_counter()
            self.seconds.append(now - self.last)
            self.last = now

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    recorder = RecordHFSteps()
    args = TrainingArguments(
        output_dir=t.output_dir, max_steps=t.max_steps, per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum_steps, max_grad_norm=t.max_grad_norm, seed=t.seed,
        logging_steps=1, logging_nan_inf_filter=False, save_strategy="no", eval_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, train_sampling_strategy="sequential",
        use_cpu=device.type == "cpu", bf16=amp_dtype == torch.bfloat16, fp16=amp_dtype == torch.float16,
        use_liger_kernel=use_liger,
    )
    hf_trainer = HFTrainer(model=model, args=args, train_dataset=samples, optimizers=(optimizer, scheduler),
                           callbacks=[recorder])
    hf_trainer.remove_callback(PrinterCallback)  # its per-step dicts would bury bench's own report
    hf_trainer.train()
    return {**facts, "losses": recorder.losses, "step_seconds": recorder.seconds,
            "peak_mem_bytes": peak_memory_bytes(device), "initial_checksum": checksum}


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result_path = Path(spec["result"])
    try:
        config = load_config(spec["config"])
        if spec["side"] == "peer":
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
