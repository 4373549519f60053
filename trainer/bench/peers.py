"""bench's Hugging Face peer: transformers.Trainer + LlamaForCausalLM on our initial weights and batches."""

from __future__ import annotations

import copy
import gc
import time
from pathlib import Path

import torch

from trainer.bench.side import bench_parts, package_version, side_facts
from trainer.errors import TrainerError
from trainer.models import save_hf
from trainer.runtime import peak_memory_bytes


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_hf_peer(config, spec: dict, extra_callbacks=()) -> dict:
    """The weights come from the same build as our sides (same seed, same data, so the same
    initialisation, checked by checksum) through save_hf. The batches are ours, converted as a
    Hugging Face model takes them: input_ids = labels = block[:-1]; the model shifts them itself. The optimizer
    and LR schedule are built by trainer.optim: AdamW whatever optim.name says (8-bit, GaLore and
    layer-wise updates are this trainer's), with the same parameter groups as ours.
    extra_callbacks: transformers.TrainerCallback instances added to the run (a profiler's, say).
    """
    from transformers import AutoModelForCausalLM, PrinterCallback, TrainerCallback, TrainingArguments
    from transformers import Trainer as HFTrainer

    from trainer.optim import build_optimizer, build_scheduler

    use_liger = spec["peer"] == "hf-liger"
    config = copy.deepcopy(config)
    config.optim.name = "adamw"
    t = config.train
    ours = bench_parts(config, spec["mask_last_label"])
    facts = side_facts(ours)
    facts["transformers"] = package_version("transformers")
    if use_liger:
        facts["liger_kernel"] = package_version("liger-kernel")
    samples = []
    for _ in range(t.max_steps):
        for mb in ours.loader.next_step():
            samples += [{"input_ids": row, "labels": row} for row in mb["input_ids"]]
    weights_dir = Path(t.output_dir) / "initial_weights"
    save_hf(ours.model, weights_dir)
    device, amp_dtype, param_dtype = ours.device, ours.compute_dtype, next(ours.model.parameters()).dtype
    del ours
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    model, loading = AutoModelForCausalLM.from_pretrained(
        weights_dir, dtype=param_dtype, attn_implementation="sdpa", output_loading_info=True
    )
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
        output_dir=t.output_dir,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum_steps,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        logging_steps=1,
        logging_nan_inf_filter=False,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",
        use_cpu=device.type == "cpu",
        bf16=amp_dtype == torch.bfloat16,
        fp16=amp_dtype == torch.float16,
        use_liger_kernel=use_liger,
    )
    hf_trainer = HFTrainer(
        model=model,
        args=args,
        train_dataset=samples,
        optimizers=(optimizer, scheduler),
        callbacks=[recorder, *extra_callbacks],
    )
    hf_trainer.remove_callback(PrinterCallback)  # its per-step dicts would bury bench's own report
    hf_trainer.train()
    return {
        **facts,
        "losses": recorder.losses,
        "step_seconds": recorder.seconds,
        "peak_mem_bytes": peak_memory_bytes(device),
    }
