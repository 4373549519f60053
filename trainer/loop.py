"""The training loop: accumulation, mixed precision, clipping, evaluation, checkpoints, callbacks.

One optimizer step (`train_step`), in order: copy the step's micro-batches to the device (built
one step ahead on a background thread); forward and backward each micro-batch with its summed
token loss divided by the label-token count of the whole global step, so accumulation is exact
whatever the padding or the world size (`forward_backward_step`); unscale (fp16), measure and
clip the gradient norm; step the optimizer and the schedule. A non-finite loss or norm skips the
update on the device: torch's fused AdamW takes the verdict as `found_inf`; other optimizers
read it on the host, one sync per step.

Between log steps nothing is read back from the device. Every `train.log_every` steps, and
before an evaluation or a checkpoint, one transfer brings back the losses, token counts and norms
of the steps since the last read (and the ranks' stop votes); `train` then logs them, fires the
callbacks and enforces `train.max_nonfinite_steps`.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.build import RunParts, build_run
from trainer.callbacks import CallbackList, TrainerControl, TrainerState
from trainer.checkpoint import latest_checkpoint
from trainer.config import TrainConfig, report_to, to_toml
from trainer.errors import TrainerError
from trainer.hf_callbacks import adapt_hf_callbacks
from trainer.metrics import MetricsLogger, PendingSteps, Throughput
from trainer.model_card import hardware_name, render_model_card
from trainer.optim import state_bytes
from trainer.parallel import all_reduce_sum, clip_grad_norm, gradient_sync, shutdown
from trainer.prefetch import StepBatch, StepPrefetcher
from trainer.runtime import DTYPE_NAMES, autocast, parameter_count, peak_memory_bytes, tensor_bytes
from trainer.summary import write_run_summary
from trainer.trackers import TrackedRun, Trackers, check_installed


@dataclass
class StepResult:
    """One optimizer step's figures, still on the device."""

    loss: torch.Tensor  # this rank's share of the step's mean token loss
    label_tokens: torch.Tensor  # over all ranks
    grad_norm: torch.Tensor  # over all ranks, before clipping


class Trainer:
    """Trainer(config, callbacks=[...]).train() runs the whole job and returns the final TrainerState.

    `parts` (from trainer.build.build_run) may be passed in, built and adjusted by the caller;
    otherwise train() builds them.
    """

    def __init__(self, config: TrainConfig, callbacks=(), parts: RunParts | None = None):
        self.config = config
        self.callbacks = CallbackList(adapt_hf_callbacks(callbacks, self))  # transformers' callbacks too
        self.control = TrainerControl()
        self.parts = parts
        self.stop_signal: int | None = None  # the signal this process received
        self.stop_requested = False  # a signal reached some rank: every rank stops at the same step

    def __getattr__(self, name):  # trainer.model, trainer.optimizer, ...: the parts, once built
        parts = self.__dict__.get("parts")
        if parts is not None and hasattr(parts, name):
            return getattr(parts, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def state(self) -> TrainerState:
        return self.parts.state

    # ------------------------------------------------------------------ the step

    def forward_backward_step(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Accumulates the step's gradients; returns (this rank's share of the step loss, global label tokens)."""
        p = self.parts
        world_size = p.env.world_size
        label_tokens = all_reduce_sum(batch.label_tokens.to(p.device, non_blocking=True))
        normalizer = label_tokens.clamp(min=1)
        micro_batches = batch.to(p.device)
        loss_sum = torch.zeros((), device=p.device)
        for index, mb in enumerate(micro_batches):
            # Gradients cross ranks once per step, on the last micro-batch's backward.
            with gradient_sync(p.train_model, enabled=index == len(micro_batches) - 1):
                with autocast(p.device, p.compute_dtype):
                    loss = (
                        p.train_model(
                            mb["input_ids"],
                            labels=mb["labels"],
                            position_ids=mb.get("position_ids"),
                            document_ids=mb.get("document_ids"),
                            reduction="sum",
                        )
                        / normalizer
                    )
                # DDP and FSDP average gradients over ranks; scaled by the world size, that average
                # is the sum over the global batch, i.e. the one-process gradient.
                grad_loss = loss * world_size if world_size > 1 else loss
                (p.scaler.scale(grad_loss) if p.scaler is not None else grad_loss).backward()
            loss_sum += loss.detach().float()
        return loss_sum, label_tokens

    def train_step(self, batch: StepBatch) -> StepResult:
        """One optimizer step, with no host sync when the optimizer can skip a non-finite update itself."""
        p = self.parts
        loss, label_tokens = self.forward_backward_step(batch)
        if p.scaler is not None:
            p.scaler.unscale_(p.optimizer)
        steps_in_backward = getattr(p.optimizer, "steps_in_backward", False)
        if steps_in_backward:  # gradients are already used and freed; the hooks measured their norm
            grad_norm = p.optimizer.grad_norm()
        else:
            grad_norm = clip_grad_norm(p.params, self.config.train.max_grad_norm)
        if p.scaler is not None:
            p.scaler.step(p.optimizer)  # skips the update itself when the gradients overflowed
            p.scaler.update()
        else:
            finite = torch.isfinite(loss) & torch.isfinite(grad_norm.to(loss.device))
            if skips_on_device(p.optimizer):
                p.optimizer.found_inf = (~finite).float()
                p.optimizer.step()
            elif finite.item():  # the one sync per step of optimizers that cannot take found_inf
                p.optimizer.step()
            elif steps_in_backward:
                raise TrainerError(
                    f"step {self.state.step + 1}: non-finite loss or gradient with optim.name="
                    f"{self.config.optim.name}, whose updates already happened during backward, so the step cannot "
                    "be skipped and the weights may be damaged; stopped without saving. Resume from the last good "
                    f"checkpoint ({latest_checkpoint(p.output.folder) or 'none'}) with a lower optim.lr or "
                    "train.dtype=fp32"
                )
        p.scheduler.step()
        p.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, label_tokens, grad_norm)

    def evaluate(self) -> dict | None:
        """The validation loss of the current weights (None when the run has no validation data)."""
        if self.parts.evaluator is None:
            return None
        return {"step": self.state.step, **self.parts.evaluator(self.parts.model)}

    # ------------------------------------------------------------------ the run

    def train(self) -> TrainerState:
        failed = True
        try:
            if self.parts is None:
                check_installed(report_to(self.config.train))  # one line, before the output folder is touched
                self.parts = build_run(self.config)
            self.config = self.parts.config
            state = self._run()
            failed = False
            return state
        finally:
            if self.parts is not None:
                shutdown(self.parts.env, failed)

    def _on_signal(self, signum, frame):
        if self.stop_signal is not None:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.stop_signal = signum
        self.metrics.message(
            f"received {signal.Signals(signum).name}: finishing this step, saving a checkpoint, "
            "then exiting (press Ctrl-C again to stop at once, without saving)"
        )

    def _run(self) -> TrainerState:
        p, t = self.parts, self.config.train
        # Rank 0 tracks; a resumed run reopens the tracker runs its checkpoint names.
        self.trackers = Trackers(report_to(t) if p.env.is_main else [])
        tracked = TrackedRun(
            folder=p.output.folder,
            name=p.output.folder.name,
            config=self.config.to_dict(),
            config_toml=to_toml(self.config),
            resume_ids=dict(p.state.tracker_runs),
            start_step=p.state.step,
        )
        p.state.tracker_runs.update(self.trackers.start(tracked))
        if p.checkpointer is not None and p.env.is_main:
            p.checkpointer.model_card = self.model_card  # README.md in final/ and each checkpoint
        self.metrics = MetricsLogger(
            p.output.folder,
            enabled=p.env.is_main,
            progress=t.progress,
            max_steps=t.max_steps,
            start_step=p.state.step,
            log_every=t.log_every,
            trackers=self.trackers,
        )
        self.prefetcher = StepPrefetcher(p.loader, pin=p.device.type == "cuda", vocab_size=p.model.args.vocab_size)
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        failed = True
        try:
            for text in [p.describe(), *p.messages]:
                self.metrics.message(text)
            state = self._loop()
            failed = False
            return state
        finally:
            self.prefetcher.close()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            self.metrics.close()
            self.trackers.finish(failed)

    def _loop(self) -> TrainerState:
        p, t, state, control = self.parts, self.config.train, self.parts.state, self.control
        self.callbacks.fire("on_train_begin", self.config, state, control, model=p.model)
        if state.step == 0 and p.evaluator is not None:
            self.metrics.log_eval(self.evaluate())  # the starting point of the eval curve
        self.pending, self.streak = PendingSteps(p.device), 0
        self.loader_state = p.loader.state_dict()  # before the prefetcher's thread takes the loader over
        self.run_start, self.start_step, self.start_tokens = time.perf_counter(), state.step, state.tokens_seen
        self.earlier_runtime_s = state.runtime_s  # a resumed run's earlier sessions
        self.throughput = Throughput(t.micro_batch_size * t.grad_accum_steps * t.seq_len * p.env.world_size)
        if p.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(p.device)
        save_every, eval_every = self.config.checkpoint.save_every, t.eval_every

        while state.step < t.max_steps:
            self.callbacks.fire("on_step_begin", self.config, state, control)
            batch = self.prefetcher.next()
            lr = p.optimizer.param_groups[0]["lr"]
            result = self.train_step(batch)
            state.step += 1
            self.loader_state = batch.loader_state
            self.pending.add(state.step, lr, result.loss, result.label_tokens, result.grad_norm)
            self.callbacks.fire("on_step_end", self.config, state, control, model=p.model)

            last = state.step == t.max_steps
            eval_due = control.should_evaluate or (eval_every and state.step % eval_every == 0) or last
            save_due = control.should_save or (save_every and state.step % save_every == 0) or last
            local_stop = control.should_training_stop or (self.stop_signal is not None and p.env.world_size == 1)
            if state.step % t.log_every == 0 or eval_due or save_due or local_stop:
                self._read_back()
            if eval_due and p.evaluator is not None:
                self._run_eval()
            stopping = control.should_training_stop or self.stop_requested
            if (control.should_save or save_due or stopping) and self.streak == 0 and p.checkpointer is not None:
                self._save()  # never in the middle of a non-finite streak
            control.should_evaluate = control.should_save = False
            if stopping:
                break

        if self.stop_requested:
            by = signal.Signals(self.stop_signal).name if self.stop_signal else "a signal to another rank"
            self.metrics.message(
                f"stopped at step {state.step} by {by}; checkpoint saved. Continue with "
                f"--checkpoint.resume_from=latest --train.output_dir={p.output.folder}"
            )
        else:
            self._finish()
        self.callbacks.fire("on_train_end", self.config, state, control, model=p.model)
        return state

    def _read_back(self) -> None:
        """The host sync: logs the steps since the last one, fires on_log, enforces the non-finite limit."""
        p, t, state = self.parts, self.config.train, self.parts.state
        records, stop_voted = self.pending.read(stop_vote=self.stop_signal is not None)
        self.stop_requested = self.stop_requested or stop_voted
        tokens_per_s, peak = self.throughput.window(len(records)), peak_memory_bytes(p.device)
        by_source = self.loader_state.get("tokens_by_source")  # a mixture's tokens drawn per source, to date
        for record in records:
            record.update(tokens_per_s=tokens_per_s, peak_mem_bytes=peak)
            if by_source and record is records[-1]:
                record["tokens_by_source"] = by_source
            if record["step"] == self.start_step + 1:
                steps_in_backward = getattr(p.optimizer, "steps_in_backward", False)
                record.update(
                    param_bytes=tensor_bytes(p.params),
                    optim_state_bytes=state_bytes(p.optimizer),
                    grad_bytes=p.optimizer.peak_grad_bytes if steps_in_backward else tensor_bytes(p.params),
                )
            finite = math.isfinite(record["loss"]) and (p.scaler is not None or math.isfinite(record["grad_norm"]))
            state.tokens_seen += record["tokens"]
            if finite:
                self.streak = 0
            else:
                state.nonfinite_steps += 1
                self.streak += 1
                self.metrics.message(
                    f"step {record['step']}: non-finite loss or gradient ({record['loss']}, "
                    f"{record['grad_norm']}); update skipped"
                )
            state.log_history.append({k: record[k] for k in ("step", "loss", "lr", "grad_norm")})
            eta_s = self.throughput.seconds_per_step * (t.max_steps - record["step"])
            self.metrics.log_step(record, eta_s, warming_up=self.throughput.warming_up)
            self.callbacks.fire("on_log", self.config, state, self.control, logs=record)
            if self.streak >= t.max_nonfinite_steps:
                raise TrainerError(
                    f"the loss or gradient was non-finite for {self.streak} steps in a row (up to step "
                    f"{record['step']}); stopped without saving. Last good checkpoint: "
                    f"{latest_checkpoint(p.output.folder) or 'none'}. Try a lower optim.lr, train.dtype=bf16 or "
                    "fp32, or check the data"
                )
        state.runtime_s = self.earlier_runtime_s + time.perf_counter() - self.run_start
        blocks = max(1, self.loader_state.get("blocks_per_epoch", 1))
        state.epoch = self.loader_state.get("epoch", 0) + self.loader_state.get("position", 0) / blocks

    def _run_eval(self) -> None:
        state = self.parts.state
        metrics = self.evaluate()
        state.log_history.append(metrics)
        if state.best_metric is None or metrics["eval_loss"] < state.best_metric:
            state.best_metric = metrics["eval_loss"]
        self.metrics.log_eval(metrics)
        self.callbacks.fire("on_evaluate", self.config, state, self.control, metrics=metrics, model=self.parts.model)

    def _save(self) -> None:
        p, state = self.parts, self.parts.state
        evals = [r for r in state.log_history if "eval_loss" in r]
        if evals and evals[-1]["step"] == state.step and evals[-1]["eval_loss"] == state.best_metric:
            state.best_checkpoint = str(p.output.folder / f"checkpoint-{state.step}")
        path = p.checkpointer.save(
            state.step,
            model=p.model,
            optimizer=p.optimizer,
            scheduler=p.scheduler,
            scaler=p.scaler,
            trainer_state=state.to_dict(),
            sampler_state=self.loader_state,
        )
        self.callbacks.fire("on_save", self.config, state, self.control, checkpoint=path)

    def model_card(self, folder: Path) -> str:
        """The model card of `folder` (final/ or a checkpoint) as the run stands now."""
        p = self.parts
        return render_model_card(
            folder,
            self.config,
            p.state,
            parameters=parameter_count(p.model.parameters()),
            trainable=parameter_count(p.params),
            precision=DTYPE_NAMES[p.compute_dtype],
            hardware=hardware_name(p.device),
            world_size=p.env.world_size,
        )

    def _finish(self) -> None:
        """final/, train_results.json, loss.png and a summary of where everything went."""
        p, state = self.parts, self.parts.state
        final = p.checkpointer.save_final(p.model) if p.checkpointer is not None else None
        if not p.env.is_main:
            return
        summary = write_run_summary(
            p.output.folder,
            state,
            start_step=self.start_step,
            start_tokens=self.start_tokens,
            runtime_s=time.perf_counter() - self.run_start,
            tokens_per_s=self.throughput.steady,
            peak_mem_bytes=peak_memory_bytes(p.device),
            n_params=parameter_count(p.model.parameters()),
            device=p.device,
            final=final,
        )
        self.metrics.message("\n" + summary)


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """True for torch's fused Adam/AdamW, which skip the whole update when `optimizer.found_inf` is 1."""
    fused = [group.get("fused") for group in optimizer.param_groups]
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and all(fused)
