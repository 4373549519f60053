"""The training loop: accumulation, mixed precision, clipping, evaluation, checkpoints, callbacks.

One optimizer step, in order: take this step's micro-batches; count their label tokens (on the
host, from the CPU batches; with several ranks summed over them in one all-reduce that the host
never waits for); forward and backward each micro-batch with its summed token loss divided by that
count, so accumulation is exact whatever the padding or the world size; unscale (fp16),
measure and clip the gradient norm; read the loss and the norm back in ONE host sync; skip the
update if either is non-finite; step the optimizer and the schedule; log; evaluate and save when due.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import shutil
import signal
import threading
import time
from datetime import datetime
from pathlib import Path

import torch

from trainer.callbacks import CallbackList, TrainerControl, TrainerState
from trainer.checkpoint import (GatheredModel, checkpoint_dirs, latest_checkpoint, load_checkpoint, rotate_checkpoints,
                                save_checkpoint)
from trainer.config import TrainConfig, to_toml
from trainer.errors import CheckpointError, ConfigError, TrainerError
from trainer.metrics import MetricsLogger, format_duration, read_metrics, truncate_metrics
from trainer.models import KernelChoice, build, load_hf
from trainer.models.config import resolve_args
from trainer.optim import build_optimizer, build_scheduler, state_bytes
from trainer.parallel import (all_reduce_sum, clip_grad_norm, gradient_sync, init_distributed, is_sharded,
                              main_process_first, parallelize, shutdown)
from trainer.parallel.sharded_checkpoint import full_model_state

IGNORE_INDEX = -100
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RUN_OUTPUTS = ("metrics.jsonl", "train_results.json", "loss.png", "config.toml", "final", "tensorboard")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available; use train.device=auto or cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_ok else torch.float32
    return DTYPES[name]


def kernel_choice(k) -> KernelChoice:
    """kernels.* switches -> how the model runs each op (a switched-off kernel runs its reference)."""
    if not k.enabled:
        return KernelChoice.eager()
    pick = lambda on: None if on else "reference"  # noqa: E731
    return KernelChoice(rms_norm=pick(k.rms_norm), rope=pick(k.rope), swiglu=pick(k.swiglu),
                        materialize_logits=not k.fused_ce)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


class Trainer:
    """Trainer(config, callbacks=[...]).train() runs the whole job and returns the final TrainerState."""

    def __init__(self, config: TrainConfig, callbacks=()):
        self.config = config.validate()
        self.callbacks = CallbackList(callbacks)
        self.state = TrainerState(max_steps=config.train.max_steps)
        self.control = TrainerControl()
        self.stop_signal: int | None = None  # the signal this process received
        self.stop_requested = False  # a signal reached some rank: every rank stops after this step
        self.rank, self.world_size, self.is_main = 0, 1, True

    # ------------------------------------------------------------------ setup

    def _prepare_output_dir(self) -> Path | None:
        """Creates the output folder; returns the checkpoint to resume from, if any."""
        t, ck = self.config.train, self.config.checkpoint
        resume = None
        if ck.resume_from and ck.resume_from != "latest":
            resume = Path(ck.resume_from)
            if not resume.is_dir():
                raise CheckpointError(f"checkpoint.resume_from={ck.resume_from!r} does not exist")
            if not t.output_dir:
                t.output_dir = str(resume.parent)
        if not t.output_dir:
            t.output_dir = str(Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
        out = Path(t.output_dir)
        if ck.resume_from == "latest":
            resume = latest_checkpoint(out)
            if resume is None:
                self._early_messages.append(f"checkpoint.resume_from=latest: no checkpoint in {out} yet, starting fresh")
        if resume is None and (checkpoint_dirs(out) or (out / "final").exists()):
            if not t.overwrite:
                raise TrainerError(f"{out} already holds checkpoints of another run; resume it with "
                                   "--checkpoint.resume_from=latest, choose another --train.output_dir, "
                                   "or pass --train.overwrite=true to replace them")
            for p in checkpoint_dirs(out) + [out / name for name in RUN_OUTPUTS]:
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        out.mkdir(parents=True, exist_ok=True)
        return resume

    def _build_model(self, tokenizer_vocab: int):
        m = self.config.model
        kernels = kernel_choice(self.config.kernels)
        if m.from_hf:
            if not Path(m.from_hf).is_dir():
                raise ConfigError(f"model.from_hf={m.from_hf!r} is not a folder")
            model = load_hf(m.from_hf, kernels)
        else:
            try:
                args = resolve_args(m.preset, tokenizer_vocab, vocab_size=m.vocab_size, hidden_size=m.hidden_size,
                                    intermediate_size=m.intermediate_size, n_layers=m.n_layers, n_heads=m.n_heads,
                                    n_kv_heads=m.n_kv_heads, max_seq_len=m.max_seq_len, rope_theta=m.rope_theta,
                                    tie_embeddings=m.tie_embeddings, qkv_bias=m.qkv_bias)
            except KeyError:
                from trainer.models import PRESETS
                raise ConfigError(f"model.preset={m.preset!r} is unknown; choose one of: {', '.join(PRESETS)}") from None
            except ValueError as e:
                raise ConfigError(f"model: {e}") from None
            model = build(args, kernels=kernels, seed=self.config.train.seed)
        if tokenizer_vocab > model.args.vocab_size:
            raise ConfigError(f"the tokenizer has {tokenizer_vocab} tokens but the model's vocabulary is only "
                              f"{model.args.vocab_size}; set model.vocab_size or use a matching tokenizer")
        if self.config.train.seq_len > model.args.max_seq_len:
            raise ConfigError(f"train.seq_len={self.config.train.seq_len} is longer than the model allows "
                              f"(max_seq_len {model.args.max_seq_len}); lower train.seq_len")
        window = model.args.sliding_window
        if window is not None and self.config.train.seq_len > window:
            raise ConfigError(f"train.seq_len={self.config.train.seq_len} is longer than the model's sliding window "
                              f"({window}), which this trainer does not implement; use train.seq_len <= {window}")
        return model

    def _setup(self):
        from trainer.data import BlockLoader

        cfg, t = self.config, self.config.train
        self._early_messages: list[str] = []
        self.parallel_env, self.device = init_distributed(cfg.parallel.strategy, resolve_device(t.device))
        self.rank, self.world_size, self.is_main = (self.parallel_env.rank, self.parallel_env.world_size,
                                                    self.parallel_env.is_main)
        self.amp_dtype = resolve_dtype(t.dtype, self.device)
        if t.threads:
            torch.set_num_threads(t.threads)
        d = cfg.data
        tokenizer_spec = d.tokenizer
        if cfg.model.from_hf and tokenizer_spec == "bpe" and (Path(cfg.model.from_hf) / "tokenizer.json").is_file():
            tokenizer_spec = cfg.model.from_hf  # fine-tuning keeps the checkpoint's own tokenizer
        with main_process_first(self.parallel_env):  # rank 0 clears the folder and fills the token cache first
            resume = self._prepare_output_dir()
            self.data = load_data(cfg, tokenizer_spec)
        self.output_dir = Path(t.output_dir)
        self.tokenizer = self.data.tokenizer

        torch.manual_seed(t.seed)
        model = self._build_model(self.tokenizer.vocab_size)
        param_dtype = DTYPES[t.param_dtype]
        self.model = model.to(self.device, dtype=param_dtype)
        self.model.train()
        # The optimizer is built after sharding: FSDP2 replaces the parameters with their shards.
        self.train_model = parallelize(self.model, cfg.parallel, self.parallel_env, self.device, self.amp_dtype)
        self.sharded = is_sharded(self.model)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        # Layer-wise optimizers update each parameter inside backward (trainer/optim/layerwise.py).
        self.steps_in_backward = getattr(self.optimizer, "steps_in_backward", False)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, t.max_steps)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.loader = BlockLoader(self.data.train, t.seq_len, t.micro_batch_size, t.grad_accum_steps,
                                  world_size=self.world_size, rank=self.rank, seed=t.seed,
                                  document_ids=d.document_mask)
        self.config_toml = to_toml(cfg)
        if resume is not None:
            saved = load_checkpoint(resume, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                    scaler=self.scaler, sharded=self.sharded)
            self.state = TrainerState.from_dict(saved["trainer"])
            self.state.max_steps = t.max_steps
            try:
                self.loader.load_state_dict(saved["sampler"])
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"the data sampler in {resume} does not fit this run's data: {e}") from None
            self._early_messages.append(f"resumed from {resume} at step {self.state.step}")
        if self.is_main:
            (self.output_dir / "config.toml").write_text(self.config_toml)
            truncate_metrics(self.output_dir / "metrics.jsonl", self.state.step)
        self.metrics = MetricsLogger(self.output_dir, enabled=self.is_main, progress=t.progress,
                                     max_steps=t.max_steps, start_step=self.state.step, log_every=t.log_every,
                                     tensorboard=t.tensorboard)
        n_params = sum(p.numel() for p in self.params)
        self.metrics.message(f"model: {n_params / 1e6:.2f}M parameters | device {self.device} | compute dtype "
                             f"{str(self.amp_dtype).removeprefix('torch.')} | data: {len(self.data.train):,} "
                             f"training tokens | output: {self.output_dir}"
                             + (f" | {self.world_size} ranks, {cfg.parallel.strategy}" if self.world_size > 1 else ""))
        for text in self._early_messages:
            self.metrics.message(text)

    def autocast(self):
        if self.amp_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------ the step

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def forward_backward(self, micro_batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Accumulates the step's gradients; returns (this rank's share of the step loss, label tokens).

        Each micro-batch's summed token loss is divided by the label-token count of the whole
        global step, so 4 x 1 equals 1 x 4 (and 2 ranks x 2) whatever is ignored. The count is taken
        from the CPU batches; with several ranks it is summed over them on the device in one
        all-reduce, which the host never waits for.
        """
        n_tokens = sum((mb["labels"] != IGNORE_INDEX).sum() for mb in micro_batches)
        if self.world_size > 1:
            n_tokens = all_reduce_sum(n_tokens.to(self.device, non_blocking=True))
        normalizer = n_tokens.clamp(min=1)
        loss_sum = torch.zeros((), device=self.device)
        for index, mb in enumerate(micro_batches):
            mb = self._to_device(mb)
            # Gradients cross ranks once per step, on the last micro-batch's backward.
            with gradient_sync(self.train_model, enabled=index == len(micro_batches) - 1):
                with self.autocast():
                    loss = self.train_model(mb["input_ids"], labels=mb["labels"], position_ids=mb.get("position_ids"),
                                            document_ids=mb.get("document_ids"), reduction="sum") / normalizer
                # DDP and FSDP average gradients over ranks; scaled by the world size, that average
                # is the sum over the global batch, i.e. the one-process gradient.
                grad_loss = loss * self.world_size if self.world_size > 1 else loss
                (self.scaler.scale(grad_loss) if self.scaler is not None else grad_loss).backward()
            loss_sum += loss.detach().float()
        return loss_sum, n_tokens

    def train_step(self, micro_batches: list[dict]) -> tuple[float, float, int, float]:
        """One optimizer step; returns (loss, grad_norm, label tokens, lr) after a single host sync."""
        loss_sum, n_tokens = self.forward_backward(micro_batches)
        # A stop signal seen by any rank stops every rank after this same step (ranks that saved at
        # different steps would wait on each other forever). One all-reduce carries the votes and
        # makes the logged loss the global step's; in one process it is the identity.
        stop_vote = torch.tensor(float(self.stop_signal is not None), device=loss_sum.device)
        loss_sum, stop_votes = all_reduce_sum(torch.stack([loss_sum, stop_vote])).unbind()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.steps_in_backward:  # gradients are already used and freed; the hooks measured their norm
            grad_norm = self.optimizer.grad_norm()
        else:
            grad_norm = clip_grad_norm(self.params, self.config.train.max_grad_norm)  # the norm over all ranks
        loss_value, norm_value, n_tokens, stop_votes = torch.stack(  # the step's one sync
            [loss_sum.double(), grad_norm.to(loss_sum.device, torch.float64),  # CPU under fsdp_cpu_offload
             n_tokens.to(loss_sum.device, torch.float64, non_blocking=True), stop_votes.double()]).tolist()
        n_tokens = int(n_tokens)
        self.stop_requested = stop_votes > 0

        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the update itself when the gradients overflowed
            self.scaler.update()
        elif math.isfinite(loss_value) and math.isfinite(norm_value):
            self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, norm_value, n_tokens, lr

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        from trainer.data import eval_batches

        if self.data.val is None:
            return None
        t = self.config.train
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        for batch in eval_batches(self.data.val, t.seq_len, t.micro_batch_size, max_batches=t.eval_batches or None,
                                  world_size=self.world_size, rank=self.rank,
                                  document_ids=self.config.data.document_mask):
            count += int((batch["labels"] != IGNORE_INDEX).sum())
            batch = self._to_device(batch)
            with self.autocast():
                total += self.model(batch["input_ids"], labels=batch["labels"],
                                    position_ids=batch.get("position_ids"), document_ids=batch.get("document_ids"),
                                    reduction="sum").double()
        self.model.train()
        if self.world_size > 1:
            total, count = all_reduce_sum(torch.stack([total, torch.tensor(count, dtype=torch.float64,
                                                                           device=self.device)])).tolist()
            count = int(count)
        else:
            total = total.item()
        loss = total / max(count, 1)
        return {"step": self.state.step, "eval_loss": loss, "perplexity": math.exp(min(loss, 700.0)),
                "eval_tokens": count}

    # ------------------------------------------------------------------ events

    def _run_eval(self) -> None:
        metrics = self.evaluate()
        if metrics is None:
            return
        self.state.log_history.append(metrics)
        if self.state.best_metric is None or metrics["eval_loss"] < self.state.best_metric:
            self.state.best_metric = metrics["eval_loss"]
        self.metrics.log_eval(metrics)
        self.callbacks.fire("on_evaluate", self.config, self.state, self.control, metrics=metrics, model=self.model)

    def _save(self) -> Path | None:
        path = None
        if self._best_is_current():
            self.state.best_checkpoint = str(self.output_dir / f"checkpoint-{self.state.step}")
        if self.is_main or self.sharded:  # every rank writes its own shards
            path = save_checkpoint(self.output_dir, self.state.step, model=self.model, optimizer=self.optimizer,
                                   scheduler=self.scheduler, scaler=self.scaler, trainer_state=self.state.to_dict(),
                                   sampler_state=self.loader.state_dict(), config_toml=self.config_toml,
                                   tokenizer=self.tokenizer, sharded=self.sharded, is_main=self.is_main)
        if self.is_main:
            rotate_checkpoints(self.output_dir, self.config.checkpoint.keep_last, self.state.best_checkpoint)
        self.callbacks.fire("on_save", self.config, self.state, self.control, checkpoint=path)
        return path

    def _best_is_current(self) -> bool:
        """True when this step's evaluation is the best so far."""
        evals = [r for r in self.state.log_history if "eval_loss" in r]
        return bool(evals) and evals[-1]["step"] == self.state.step and evals[-1]["eval_loss"] == self.state.best_metric

    def _on_signal(self, signum, frame):
        if self.stop_signal is not None:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.stop_signal = signum
        self.metrics.message(f"received {signal.Signals(signum).name}: finishing this step, saving a checkpoint, "
                             "then exiting (press Ctrl-C again to stop at once)")

    # ------------------------------------------------------------------ the run

    def train(self) -> TrainerState:
        failed = True
        try:
            state = self._setup_and_train()
            failed = False
            return state
        finally:
            if hasattr(self, "parallel_env"):
                shutdown(self.parallel_env, failed)

    def _setup_and_train(self) -> TrainerState:
        self._setup()
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            return self._train()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            self.metrics.close()

    def _train(self) -> TrainerState:
        cfg, t, state = self.config, self.config.train, self.state
        self.callbacks.fire("on_train_begin", self.config, state, self.control, model=self.model)
        initial_eval = None
        if state.step == 0:
            initial_eval = self.evaluate()
        run_start = time.perf_counter()
        start_step, streak, tokens_per_s = state.step, 0, []
        step_input_tokens = t.micro_batch_size * t.grad_accum_steps * t.seq_len * self.world_size
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

        while state.step < t.max_steps:
            self.callbacks.fire("on_step_begin", self.config, state, self.control)
            step_start = time.perf_counter()
            micro_batches = self.loader.next_step()
            loss, grad_norm, n_tokens, lr = self.train_step(micro_batches)
            elapsed = time.perf_counter() - step_start
            state.step += 1
            state.tokens_seen += n_tokens
            state.epoch = self.loader.epoch + self.loader.position / max(1, self.loader.blocks_per_epoch)

            if not math.isfinite(loss) or (self.scaler is None and not math.isfinite(grad_norm)):
                state.nonfinite_steps += 1
                streak += 1
                self.metrics.message(f"step {state.step}: non-finite loss or gradient ({loss}, {grad_norm}); "
                                     "update skipped")
                if self.steps_in_backward:
                    raise TrainerError(
                        f"step {state.step}: non-finite loss or gradient with optim.name={cfg.optim.name}, whose "
                        "updates already happened during backward, so the step cannot be skipped and the weights "
                        f"may be damaged; stopped without saving. Resume from the last good checkpoint "
                        f"({latest_checkpoint(self.output_dir) or 'none'}) with a lower optim.lr or train.dtype=fp32")
                if streak >= t.max_nonfinite_steps:
                    latest = latest_checkpoint(self.output_dir)
                    raise TrainerError(
                        f"the loss or gradient was non-finite for {streak} steps in a row (up to step {state.step}); "
                        f"stopped without saving. Last good checkpoint: {latest or 'none'}. Try a lower optim.lr, "
                        "train.dtype=bf16 or fp32, or check the data")
            else:
                streak = 0

            record = {"step": state.step, "loss": loss, "lr": lr,
                      "grad_norm": grad_norm, "tokens": n_tokens,
                      "tokens_per_s": step_input_tokens / elapsed, "peak_mem_bytes": peak_memory_bytes(self.device)}
            if state.step == start_step + 1:
                grad_bytes = self.optimizer.peak_grad_bytes if self.steps_in_backward else tensor_bytes(self.params)
                record.update(param_bytes=tensor_bytes(self.params), grad_bytes=grad_bytes,
                              optim_state_bytes=state_bytes(self.optimizer))
            tokens_per_s.append(record["tokens_per_s"])
            state.log_history.append({k: record[k] for k in ("step", "loss", "lr", "grad_norm")})
            self.metrics.log_step(record)
            self.callbacks.fire("on_log", self.config, state, self.control, logs=record)
            self.callbacks.fire("on_step_end", self.config, state, self.control, model=self.model)

            last = state.step == t.max_steps
            stopping = self.control.should_training_stop or self.stop_requested
            if self.control.should_evaluate or (t.eval_every and state.step % t.eval_every == 0) or last:
                self._run_eval()
            save_every = cfg.checkpoint.save_every
            due = self.control.should_save or (save_every and state.step % save_every == 0) or last or stopping
            if due and streak == 0:  # no checkpoint in the middle of a non-finite streak
                self._save()
            self.control.should_evaluate = self.control.should_save = False
            if stopping:
                break

        if self.stop_requested:
            by = signal.Signals(self.stop_signal).name if self.stop_signal else "a signal to another rank"
            self.metrics.message(f"stopped at step {state.step} by {by}; "
                                 f"checkpoint saved. Continue with --checkpoint.resume_from=latest "
                                 f"--train.output_dir={self.output_dir}")
        else:
            self._finish(initial_eval, time.perf_counter() - run_start, tokens_per_s, start_step)
        self.callbacks.fire("on_train_end", self.config, state, self.control, model=self.model)
        return state

    def _finish(self, initial_eval, runtime, tokens_per_s, start_step) -> None:
        """final/ model, train_results.json, loss.png and a summary of where everything went."""
        # Gathering a sharded model takes every rank; only rank 0 writes.
        export = GatheredModel(self.model.args, full_model_state(self.model)) if self.sharded else self.model
        if not self.is_main:
            return
        from trainer.plot import plot_losses

        state, out = self.state, self.output_dir
        final, tmp = out / "final", out / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        from trainer.models import save_hf
        save_hf(export, tmp)
        self.tokenizer.save(tmp)
        (tmp / "run_config.toml").write_text(self.config_toml)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)

        records = read_metrics(out / "metrics.jsonl")
        evals = [r for r in records if r.get("eval_loss") is not None]
        steady = tokens_per_s[1:] or tokens_per_s  # the first step pays for warm-up
        results = {
            "steps": state.step, "tokens_seen": state.tokens_seen, "runtime_s": runtime,
            "tokens_per_s": sum(steady) / len(steady) if steady else None,
            "final_train_loss": next((r["loss"] for r in reversed(records) if r.get("loss") is not None), None),
            "initial_eval_loss": initial_eval["eval_loss"] if initial_eval else None,
            "eval_loss": evals[-1]["eval_loss"] if evals else None,
            "perplexity": evals[-1]["perplexity"] if evals else None,
            "best_eval_loss": state.best_metric, "best_checkpoint": state.best_checkpoint,
            "nonfinite_steps": state.nonfinite_steps, "peak_mem_bytes": peak_memory_bytes(self.device),
            "parameters": sum(p.numel() for p in self.params), "device": str(self.device),
            "final_model": str(final),
        }
        (out / "train_results.json").write_text(json.dumps(results, indent=2) + "\n")
        initial_point = [{"step": 0, "eval_loss": initial_eval["eval_loss"]}] if initial_eval else []
        plot = plot_losses(initial_point + records, out / "loss.png")

        steps_run = state.step - start_step
        summary = [f"Trained a {results['parameters'] / 1e6:.1f}M-parameter model for {steps_run} steps "
                   f"({state.tokens_seen:,} label tokens in all) in {format_duration(runtime)} on {self.device}"
                   + (f", {results['tokens_per_s']:,.0f} tokens/s." if results["tokens_per_s"] else ".")]
        if results["eval_loss"] is not None:
            start = f"from {results['initial_eval_loss']:.3f} " if results["initial_eval_loss"] is not None else ""
            summary.append(f"Validation loss went {start}to {results['eval_loss']:.3f} "
                           f"(perplexity {results['perplexity']:.1f}).")
        summary.append(f"Final model: {final}. Checkpoints: {out}/checkpoint-*. Metrics: {out}/metrics.jsonl. "
                       + (f"Loss plot: {plot}. " if plot else "") + f"Summary: {out}/train_results.json. "
                       f"Evaluate it again with `python -m trainer eval {final}`.")
        self.metrics.message("\n" + " ".join(summary))


def load_data(cfg: TrainConfig, tokenizer_spec: str):
    """The run's tokenizer and train/val data: token blocks (data.format=text) or packed examples (sft)."""
    from trainer.data import build_tokenizer, prepare_data

    d = cfg.data
    if d.format == "sft":
        from trainer.data.sft import prepare_sft

        if tokenizer_spec == "bpe":
            raise ConfigError("data.format=sft needs an existing tokenizer: set model.from_hf to a folder with "
                              "tokenizer.json, or data.tokenizer to such a folder (or to byte)")
        return prepare_sft(d.path, build_tokenizer(tokenizer_spec), cfg.train.seq_len, d.val_fraction)
    return prepare_data(d.path, tokenizer=tokenizer_spec, vocab_size=d.vocab_size, val_fraction=d.val_fraction,
                        cache_dir=d.cache_dir or None, text_field=d.text_field)


def evaluate_checkpoint(path: str | Path, overrides: list[str] = ()) -> dict:
    """Loss and perplexity of a checkpoint-<step> or final folder on its run's validation split."""
    from trainer.config import load_config
    path = Path(path)
    if not (path / "run_config.toml").is_file():
        raise CheckpointError(f"{str(path)!r} is not a checkpoint folder (no run_config.toml); pass a "
                              "checkpoint-<step> or final folder of a run")
    cfg = load_config(path / "run_config.toml", list(overrides))
    trainer = Trainer(cfg)
    trainer.device = resolve_device(cfg.train.device)
    trainer.amp_dtype = resolve_dtype(cfg.train.dtype, trainer.device)
    trainer.data = load_data(cfg, str(path))
    if trainer.data.val is None:
        raise ConfigError("there is no validation split (data.val_fraction=0); pass --data.val_fraction=0.01 "
                          "or --data.path=<held-out text>")
    trainer.model = load_hf(path, kernel_choice(cfg.kernels)).to(trainer.device)
    state_file = path / "trainer_state.json"
    if state_file.is_file():
        trainer.state.step = json.loads(state_file.read_text())["trainer"]["step"]
    return trainer.evaluate()
