"""Hugging Face Trainer callbacks (transformers.TrainerCallback) in this trainer's loop, unchanged.

`Trainer(config, callbacks=[...])` wraps each transformers callback in an `HFCallbackAdapter`.
Before each event the adapter brings a transformers `TrainerState` and `TrainerControl` up to date
with the run, calls the callback's method of the same name with the `TrainingArguments` this run
amounts to (built once from the config: output_dir, logging/eval/save steps, batch sizes, learning
rate, metric_for_best_model=eval_loss, ...), and copies the control flags it set back, so that a
stop, save or evaluation it asks for happens in the same step.

What differs from Hugging Face Trainer, and why:
- on_log comes once per optimizer step, at each read-back (train.log_every), with state.global_step
  set to that line's step: the loop reads its losses back in batches. Each evaluation is logged too.
- state.best_metric is the lowest eval_loss of the evaluations before the one on_evaluate reports,
  as Hugging Face updates it only after on_evaluate (EarlyStoppingCallback relies on that).
- on_epoch_begin/on_epoch_end, on_substep_end and on_pre_optimizer_step/on_optimizer_step are not
  called: the loop counts steps, not epochs, and by on_step_end the gradients are already freed.
- load_best_model_at_end stays False: this trainer keeps the best checkpoint but does not reload it.
"""

from __future__ import annotations

import dataclasses
import sys

from trainer.callbacks import TrainerCallback

# optim.schedule -> the lr_scheduler_type Hugging Face names for it
SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup", "wsd": "warmup_stable_decay"}


def adapt_hf_callbacks(callbacks, trainer) -> list:
    """`callbacks` with each transformers.TrainerCallback wrapped for this loop; the others as they are."""
    # A transformers callback exists only once transformers' callback module is imported: never import it here.
    module = sys.modules.get("transformers.trainer_callback")
    if module is None:
        return list(callbacks)
    return [HFCallbackAdapter(cb, trainer) if isinstance(cb, module.TrainerCallback) else cb for cb in callbacks]


def training_arguments(config, parts):
    """The transformers.TrainingArguments a Hugging Face Trainer would have for this run."""
    import torch
    from transformers import TrainingArguments

    t, o, c = config.train, config.optim, config.checkpoint
    # transformers 5.x renamed gradient_checkpointing; the old name warns where the new one exists.
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return TrainingArguments(
        output_dir=str(parts.output.folder),
        run_name=parts.output.folder.name,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum_steps,
        learning_rate=o.lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.betas[0],
        adam_beta2=o.betas[1],
        adam_epsilon=o.eps,
        max_grad_norm=t.max_grad_norm,
        lr_scheduler_type=SCHEDULES[o.schedule],
        warmup_steps=o.warmup_steps,
        logging_strategy="steps",
        logging_steps=t.log_every,
        # eval_every=0 / save_every=0: once, at the last step
        eval_strategy="steps" if parts.evaluator is not None else "no",
        eval_steps=t.eval_every or t.max_steps,
        save_strategy="steps" if parts.checkpointer is not None else "no",
        save_steps=c.save_every or t.max_steps,
        save_total_limit=c.keep_last or None,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        seed=t.seed,
        bf16=parts.compute_dtype == torch.bfloat16,
        fp16=parts.compute_dtype == torch.float16,
        use_cpu=parts.device.type == "cpu",
        neftune_noise_alpha=t.neftune_alpha or None,
        **{checkpointing: config.parallel.activation_checkpointing != "none"},
        torch_compile=config.parallel.compile,
        disable_tqdm=t.progress != "bar",
        report_to="none",  # train.report_to does the tracking
    )


def hf_log_entry(entry: dict, epoch: float) -> dict:
    """One of our log_history lines as Hugging Face writes it: learning_rate, eval_* keys, epoch, step."""
    out = {}
    for key, value in entry.items():
        if key == "step" or isinstance(value, dict):
            continue
        if key == "lr":
            key = "learning_rate"
        elif "eval_loss" in entry and not key.startswith("eval_"):
            key = f"eval_{key}"  # perplexity -> eval_perplexity, as Hugging Face prefixes evaluation metrics
        out[key] = value
    return {**out, "epoch": epoch, "step": entry["step"]}


class HFCallbackAdapter(TrainerCallback):
    """One transformers.TrainerCallback, called with Hugging Face's (args, state, control) at our events."""

    def __init__(self, callback, trainer):
        self.callback = callback
        self.trainer = trainer  # its parts (built when training starts) give the arguments and the kwargs
        self.args = self.hf_state = self.hf_control = None
        self.synced = 0  # how many of our log_history lines hf_state.log_history holds

    def on_train_begin(self, config, state, control, **kwargs):
        from transformers import TrainerControl, TrainerState

        parts = self.trainer.parts
        self.args = training_arguments(config, parts)
        self.hf_state = TrainerState(
            logging_steps=self.args.logging_steps,
            eval_steps=self.args.eval_steps,
            save_steps=self.args.save_steps,
            train_batch_size=config.train.micro_batch_size,
            is_local_process_zero=parts.env.local_rank == 0,
            is_world_process_zero=parts.env.is_main,
            best_metric=state.best_metric,  # a resumed run's best so far
        )
        self.hf_control = TrainerControl()
        self._call("on_init_end", state, control)
        self._call("on_train_begin", state, control, **kwargs)

    def on_step_begin(self, config, state, control, **kwargs):
        self._call("on_step_begin", state, control, **kwargs)

    def on_step_end(self, config, state, control, **kwargs):
        self._call("on_step_end", state, control, **kwargs)

    def on_log(self, config, state, control, logs=None, **kwargs):
        logs = hf_log_entry(logs, state.epoch)
        step = logs.pop("step")
        self._call("on_log", state, control, step=step, logs=logs, **kwargs)

    def on_evaluate(self, config, state, control, metrics=None, **kwargs):
        entry = hf_log_entry(metrics, state.epoch)
        del entry["step"]
        # Hugging Face's Trainer logs the evaluation (on_log) before it reports it (on_evaluate).
        self._call("on_log", state, control, logs=dict(entry), **kwargs)
        self._call("on_evaluate", state, control, metrics=entry, **kwargs)
        # Hugging Face's Trainer updates the best metric after on_evaluate; so does the adapter.
        value = entry["eval_loss"]
        if self.hf_state.best_metric is None or value < self.hf_state.best_metric:
            self.hf_state.best_metric, self.hf_state.best_global_step = value, state.step

    def on_save(self, config, state, control, **kwargs):
        self._call("on_save", state, control, **kwargs)

    def on_train_end(self, config, state, control, **kwargs):
        self._call("on_train_end", state, control, **kwargs)

    def _call(self, event: str, state, control, step: int | None = None, **kwargs) -> None:
        hf = self.hf_state
        hf.global_step = state.step if step is None else step
        hf.max_steps, hf.epoch = state.max_steps, state.epoch
        hf.num_input_tokens_seen = state.tokens_seen
        hf.best_model_checkpoint = state.best_checkpoint
        for entry in state.log_history[self.synced :]:
            hf.log_history.append(hf_log_entry(entry, state.epoch))
        self.synced = len(state.log_history)
        flags = ("should_training_stop", "should_save", "should_evaluate")
        for flag in flags:
            setattr(self.hf_control, flag, getattr(control, flag))

        parts = self.trainer.parts
        hf_kwargs = {
            "model": parts.model,
            "processing_class": None,  # our tokenizer is not a transformers one
            "optimizer": parts.optimizer,
            "lr_scheduler": parts.scheduler,
            "train_dataloader": None,
            "eval_dataloader": None,
            **kwargs,
        }
        result = getattr(self.callback, event)(self.args, hf, self.hf_control, **hf_kwargs)
        if result is not None:  # a callback may return the control it changed, or another
            self.hf_control = result
        for flag in flags:
            setattr(control, flag, getattr(self.hf_control, flag))
