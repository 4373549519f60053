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
from dataclasses import dataclass

import torch

from trainer.build import RunParts, build_run
from trainer.callbacks import CallbackList, TrainerControl, TrainerState
from trainer.checkpoint import latest_checkpoint
from trainer.config import TrainConfig, report_to
from trainer.errors import TrainerError
from trainer.hf_callbacks import adapt_hf_callbacks
from trainer.metrics import MetricsLogger, RunProgress
from trainer.optim import nonfinite_after_update, skips_on_device
from trainer.parallel import all_reduce_sum, clip_grad_norm, gradient_sync, shutdown
from trainer.prefetch import StepBatch, StepPrefetcher
from trainer.runtime import autocast, parameter_count
from trainer.signals import StopSignals
from trainer.summary import write_run_summary
from trainer.trackers import Trackers, check_installed, start_trackers


@dataclass
class StepResult:
    """One optimizer step's figures, still on the device."""

    loss: torch.Tensor  # this rank's share of the step's mean token loss
    label_tokens: torch.Tensor  # over all ranks
    grad_norm: torch.Tensor  # over all ranks, before clipping
    # MoE: this rank's share of the step's load-balancing loss, then the tokens each expert of each
    # MoE layer received on this rank (PendingSteps.add); None for a dense model
    routing: torch.Tensor | None = None


class Trainer:
    """Trainer(config, callbacks=[...]).train() runs the whole job and returns the final TrainerState.

    `parts` (from trainer.build.build_run) may be passed in, built and adjusted by the caller;
    otherwise train() builds them.
    """

    def __init__(self, config: TrainConfig, callbacks=(), parts: RunParts | None = None):
        self.config = config
        self.callbacks = CallbackList(adapt_hf_callbacks(callbacks, self))  # transformers' callbacks too
        self.control = TrainerControl()
        self.parts = parts  # built by train() unless given
        self.signals = StopSignals(
            on_first=lambda name: self.metrics.message(
                f"received {name}: finishing this step, saving a checkpoint, then exiting (press Ctrl-C again "
                "to stop at once, without saving)"
            )
        )
        self.stop_requested = False  # a signal reached some rank: every rank stops at the same step
        # Set when the run starts (_run, _loop): where figures go, and what the read-backs need.
        self.metrics: MetricsLogger | None = None
        self.trackers: Trackers | None = None
        self.prefetcher: StepPrefetcher | None = None
        self.progress: RunProgress | None = None

    @property
    def stop_signal(self) -> int | None:
        """The signal this process received, if any."""
        return self.signals.received

    @property
    def state(self) -> TrainerState:
        return self.parts.state

    # ------------------------------------------------------------------ the step

    def forward_backward_step(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Accumulates the step's gradients; returns (this rank's share of the step loss, global label
        tokens, MoE routing figures or None). An MoE model's objective adds router_aux_loss_coef times
        the mean over the step's micro-batches (on every rank) of each one's load-balancing loss."""
        p = self.parts
        # The ranks of a tensor-parallel group share a batch: only the data-parallel ranks' add up.
        world_size = p.env.data_parallel_size
        label_tokens = all_reduce_sum(batch.label_tokens.to(p.device, non_blocking=True), p.env.data_parallel_group)
        normalizer = label_tokens.clamp(min=1)
        micro_batches = batch.to(p.device)
        loss_sum = torch.zeros((), device=p.device)
        routing = None
        aux_share = 1 / (len(micro_batches) * world_size)  # each micro-batch's part of the mean
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
                    objective = loss
                    aux = p.model.aux_loss()
                    if aux is not None:
                        objective = loss + p.model.args.router_aux_loss_coef * aux_share * aux
                        counts = p.model.expert_assignments().flatten()
                        figures = torch.cat([(aux_share * aux.detach()).view(1), counts]).float()
                        routing = figures if routing is None else routing + figures
                # DDP and FSDP average gradients over the data-parallel ranks; scaled by their
                # number, that average is the sum over the global batch, i.e. the one-process gradient.
                grad_loss = objective * world_size if world_size > 1 else objective
                (p.scaler.scale(grad_loss) if p.scaler is not None else grad_loss).backward()
            loss_sum += loss.detach().float()
        if p.env.tensor_parallel > 1:  # every rank of a tensor-parallel group computed the same loss
            loss_sum /= p.env.tensor_parallel
        return loss_sum, label_tokens, routing

    def train_step(self, batch: StepBatch) -> StepResult:
        """One optimizer step, with no host sync when the optimizer can skip a non-finite update itself."""
        p = self.parts
        loss, label_tokens, routing = self.forward_backward_step(batch)
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
                raise nonfinite_after_update(
                    self.state.step + 1, self.config.optim.name, latest_checkpoint(p.output.folder)
                )
        p.scheduler.step()
        p.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, label_tokens, grad_norm, routing)

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

    def _run(self) -> TrainerState:
        p, t = self.parts, self.config.train
        self.trackers = start_trackers(self.config, p.state, p.output.folder, p.env.is_main)
        if p.checkpointer is not None and p.env.is_main:
            p.checkpointer.model_card = p.model_card  # README.md in final/ and each checkpoint
        self.metrics = MetricsLogger(p.output.folder, t, p.state.step, enabled=p.env.is_main, trackers=self.trackers)
        self.prefetcher = StepPrefetcher(p.loader, pin=p.device.type == "cuda", vocab_size=p.model.args.vocab_size)
        failed = True
        try:
            with self.signals:
                for text in [p.describe(), *p.messages]:
                    self.metrics.message(text)
                state = self._loop()
            failed = False
            return state
        finally:
            self.prefetcher.close()
            self.metrics.close()
            self.trackers.finish(failed)

    def _loop(self) -> TrainerState:
        p, t, state, control = self.parts, self.config.train, self.parts.state, self.control
        self.callbacks.fire("on_train_begin", self.config, state, control, model=p.model)
        if state.step == 0 and p.evaluator is not None:
            self.metrics.log_eval(self.evaluate())  # the starting point of the eval curve
        # The loader's position is taken before the prefetcher's thread takes the loader over.
        tokens_per_step = t.micro_batch_size * t.grad_accum_steps * t.seq_len * p.env.data_parallel_size
        n_experts = p.model.args.n_experts
        run = self.progress = RunProgress(p.device, tokens_per_step, state, p.loader.state_dict(), n_experts)
        if p.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(p.device)
        save_every, eval_every = self.config.checkpoint.save_every, t.eval_every

        while state.step < t.max_steps:
            self.callbacks.fire("on_step_begin", self.config, state, control)
            batch = self.prefetcher.next()
            lr = p.optimizer.param_groups[0]["lr"]
            result = self.train_step(batch)
            state.step += 1
            run.loader_state = batch.loader_state
            run.pending.add(state.step, lr, result.loss, result.label_tokens, result.grad_norm, result.routing)
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
            if (control.should_save or save_due or stopping) and run.streak == 0 and p.checkpointer is not None:
                self._save()  # never in the middle of a non-finite streak
            control.should_evaluate = control.should_save = False
            if stopping:
                break

        if p.checkpointer is not None:
            p.checkpointer.wait()  # a save written in the background (checkpoint.async_save) is complete
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
        p, t, state, run = self.parts, self.config.train, self.parts.state, self.progress
        records, stop_voted = run.read_back(self.stop_signal is not None, p.memory_figures)
        self.stop_requested = self.stop_requested or stop_voted
        for record in records:
            finite = math.isfinite(record["loss"]) and (p.scaler is not None or math.isfinite(record["grad_norm"]))
            state.tokens_seen += record["tokens"]
            run.streak = 0 if finite else run.streak + 1
            if not finite:
                state.nonfinite_steps += 1
                self.metrics.message(
                    f"step {record['step']}: non-finite loss or gradient ({record['loss']}, "
                    f"{record['grad_norm']}); update skipped"
                )
            state.log_history.append({k: record[k] for k in ("step", "loss", "lr", "grad_norm")})
            eta_s = run.eta_s(record["step"], t.max_steps)
            self.metrics.log_step(record, eta_s, warming_up=run.throughput.warming_up)
            self.callbacks.fire("on_log", self.config, state, self.control, logs=record)
            if run.streak >= t.max_nonfinite_steps:
                raise TrainerError(
                    f"the loss or gradient was non-finite for {run.streak} steps in a row (up to step "
                    f"{record['step']}); stopped without saving. Last good checkpoint: "
                    f"{latest_checkpoint(p.output.folder) or 'none'}. Try a lower optim.lr, train.dtype=bf16 or "
                    "fp32, or check the data"
                )
        state.runtime_s = run.earlier_runtime_s + run.seconds
        blocks = max(1, run.loader_state.get("blocks_per_epoch", 1))
        state.epoch = run.loader_state.get("epoch", 0) + run.loader_state.get("position", 0) / blocks

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
            sampler_state=self.progress.loader_state,
        )
        self.callbacks.fire("on_save", self.config, state, self.control, checkpoint=path)

    def _finish(self) -> None:
        """final/, train_results.json, loss.png and a summary of where everything went."""
        p, state = self.parts, self.parts.state
        final = p.checkpointer.save_final(p.model) if p.checkpointer is not None else None
        if not p.env.is_main:
            return
        n_params = parameter_count(p.model.parameters())
        summary = write_run_summary(
            p.output.folder, state, self.progress, n_params=n_params, device=p.device, final=final
        )
        self.metrics.message("\n" + summary)
