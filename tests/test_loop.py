import json
import math

import pytest
import torch

from tests.helpers import tiny_config
from trainer import Trainer, build_run
from trainer.callbacks import TrainerCallback
from trainer.errors import TrainerError
from trainer.metrics import read_metrics
from trainer.prefetch import make_step_batch


def setup_trainer(cfg) -> Trainer:
    return Trainer(cfg, parts=build_run(cfg))


def grads_of(trainer) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in trainer.parts.model.named_parameters() if p.grad is not None}


def test_grad_accumulation_matches_one_big_batch_with_ignored_labels(tmp_path):
    trainer = setup_trainer(tiny_config(tmp_path, train__micro_batch_size=4))
    batch = trainer.parts.loader.next_step()[0]
    # Micro-batches with very different label-token counts: the step must still weigh every token alike.
    for row, n_ignored in enumerate([0, 5, 20, 31]):
        batch["labels"][row, :n_ignored] = -100

    loss_big, n_big, _ = trainer.forward_backward_step(make_step_batch([batch], loader_state={}))
    big = grads_of(trainer)
    trainer.parts.optimizer.zero_grad(set_to_none=True)
    micro = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(4)]
    loss_acc, n_acc, _ = trainer.forward_backward_step(make_step_batch(micro, loader_state={}))
    acc = grads_of(trainer)

    assert n_big == n_acc == 4 * 32 - 56
    assert math.isclose(loss_big.item(), loss_acc.item(), rel_tol=1e-6)
    for name in big:
        rel = ((big[name] - acc[name]).norm() / big[name].norm()).item()
        assert rel <= 1e-6, (name, rel)


def test_loss_falls_and_metrics_have_every_key(tmp_path):
    cfg = tiny_config(tmp_path, train__max_steps=30, optim__lr=3e-3, train__eval_every=15)
    state = Trainer(cfg).train()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "peak_mem_bytes"):
        assert all(key in r for r in steps), key
    for key in ("param_bytes", "grad_bytes", "optim_state_bytes"):
        assert steps[0][key] > 0
    # AdamW: two fp32 moments per parameter, plus a scalar step count per tensor
    assert 0 <= steps[0]["optim_state_bytes"] - 2 * steps[0]["param_bytes"] < 1024
    assert [r["step"] for r in evals] == [0, 15, 30]  # the starting point, then every eval_every steps
    assert all(math.isclose(r["perplexity"], math.exp(r["eval_loss"]), rel_tol=1e-9) for r in evals)
    results = json.loads((tmp_path / "run" / "train_results.json").read_text())
    assert results["eval_loss"] < results["initial_eval_loss"] - 0.5
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.5
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert state.step == 30 and state.best_metric == evals[-1]["eval_loss"]


def test_lr_logged_is_the_one_used(tmp_path):
    cfg = tiny_config(tmp_path, train__max_steps=6, optim__warmup_steps=3, optim__schedule="constant")
    Trainer(cfg).train()
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "lr" in r]
    assert lrs == pytest.approx([1e-3 / 4, 2e-3 / 4, 3e-3 / 4, 1e-3, 1e-3, 1e-3])


class NaNOnSteps(TrainerCallback):
    """Makes the model return a NaN loss on the given steps (1-based)."""

    def __init__(self, steps):
        self.steps = set(steps)
        self.poison = False

    def on_step_begin(self, config, state, control, **kwargs):
        self.poison = state.step + 1 in self.steps


def trainer_with_nan(cfg, callback) -> Trainer:
    """A Trainer whose model returns a NaN loss on the callback's steps."""
    parts = build_run(cfg)
    forward = parts.model.forward

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        return out * float("nan") if callback.poison and kwargs.get("labels") is not None else out

    parts.model.forward = poisoned
    return Trainer(cfg, callbacks=[callback], parts=parts)


def test_nonfinite_step_is_skipped_and_counted(tmp_path):
    cb = NaNOnSteps({2})
    trainer = trainer_with_nan(tiny_config(tmp_path, train__max_steps=3), cb)
    before = {}

    class Snapshot(TrainerCallback):
        def on_step_begin(self, config, state, control, **kwargs):
            before[state.step + 1] = [p.detach().clone() for p in trainer.parts.params]

        def on_step_end(self, config, state, control, **kwargs):
            after = [p.detach() for p in trainer.parts.params]
            changed = any(not torch.equal(a, b) for a, b in zip(after, before[state.step]))
            assert changed == (state.step != 2), state.step

    trainer.callbacks.callbacks.append(Snapshot())
    state = trainer.train()
    assert state.nonfinite_steps == 1
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert records[1]["step"] == 2 and records[1]["loss"] is None  # written as null
    assert all(torch.isfinite(p).all() for p in trainer.parts.params)


def test_many_nonfinite_steps_in_a_row_stop_without_saving(tmp_path):
    cb = NaNOnSteps({3, 4, 5})
    trainer = trainer_with_nan(
        tiny_config(tmp_path, train__max_steps=8, train__max_nonfinite_steps=3, checkpoint__save_every=2), cb
    )
    with pytest.raises(TrainerError, match="non-finite for 3 steps in a row"):
        trainer.train()
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (run / "final").exists()


def test_callback_can_stop_and_ask_for_save_and_eval(tmp_path):
    events = []

    class Control(TrainerCallback):
        def on_step_end(self, config, state, control, **kwargs):
            if state.step == 2:
                control.should_save = control.should_evaluate = True
            if state.step == 3:
                control.should_training_stop = True

        def on_evaluate(self, config, state, control, metrics=None, **kwargs):
            events.append(("evaluate", state.step))

        def on_save(self, config, state, control, checkpoint=None, **kwargs):
            events.append(("save", state.step))

        def on_train_end(self, config, state, control, **kwargs):
            events.append(("end", state.step))

    Trainer(tiny_config(tmp_path, train__max_steps=10), callbacks=[Control()]).train()
    assert events[:3] == [("evaluate", 2), ("save", 2), ("save", 3)]
    assert events[-1] == ("end", 3)


@pytest.mark.parametrize("dtype, param_dtype", [("bf16", "fp32"), ("fp16", "fp32"), ("bf16", "bf16")])
def test_mixed_precision_runs_train(tmp_path, dtype, param_dtype):
    cfg = tiny_config(tmp_path, train__max_steps=12, train__dtype=dtype, train__param_dtype=param_dtype, optim__lr=3e-3)
    trainer = Trainer(cfg)
    trainer.train()
    assert (trainer.parts.scaler is not None) == (dtype == "fp16")
    assert all(p.dtype == (torch.bfloat16 if param_dtype == "bf16" else torch.float32) for p in trainer.parts.params)
    steps = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert all(r["loss"] is not None for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.3


def test_tensorboard_events_when_asked(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Trainer(tiny_config(tmp_path, train__max_steps=3, train__tensorboard=True)).train()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    losses = [e.value for e in events.Scalars("loss")]
    logged = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert losses == pytest.approx(logged) and "eval_loss" in events.Tags()["scalars"]
