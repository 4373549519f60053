"""transformers.TrainerCallback instances in our Trainer: their args, state and control, as Hugging Face gives them."""

from __future__ import annotations

import ast

import pytest

transformers = pytest.importorskip("transformers")

from tests.helpers import tiny_config  # noqa: E402
from trainer import Trainer  # noqa: E402
from trainer.metrics import read_metrics  # noqa: E402


def lines(tmp_path, key):
    return [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if key in r]


def test_early_stopping_stops_a_run_that_no_longer_improves(tmp_path):
    # With a learning rate this small the eval loss moves far less than the threshold: no improvement.
    cfg = tiny_config(tmp_path, train__max_steps=20, train__eval_every=1, optim__lr=1e-9)
    stopper = transformers.EarlyStoppingCallback(early_stopping_patience=2, early_stopping_threshold=0.01)
    state = Trainer(cfg, callbacks=[stopper]).train()
    assert state.step == 3  # evaluation 1 sets the best; 2 and 3 fail to beat it by 0.01
    assert [r["step"] for r in lines(tmp_path, "eval_loss")] == [0, 1, 2, 3]
    assert (tmp_path / "run" / "checkpoint-3").is_dir() and (tmp_path / "run" / "final").is_dir()


def test_early_stopping_lets_an_improving_run_finish(tmp_path):
    # Hugging Face updates state.best_metric after on_evaluate: were it updated before, every
    # evaluation would look like no improvement and patience 1 would stop at the first one.
    cfg = tiny_config(tmp_path, train__max_steps=6, train__eval_every=2)
    state = Trainer(cfg, callbacks=[transformers.EarlyStoppingCallback(early_stopping_patience=1)]).train()
    evals = [r["eval_loss"] for r in lines(tmp_path, "eval_loss")]
    assert evals == sorted(evals, reverse=True)  # it did improve at every evaluation
    assert state.step == 6


def test_printer_callback_prints_every_log_and_evaluation(tmp_path, capsys):
    cfg = tiny_config(tmp_path, train__max_steps=4, train__log_every=2, train__eval_every=4)
    Trainer(cfg, callbacks=[transformers.PrinterCallback()]).train()
    printed = [ast.literal_eval(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    train = [p for p in printed if "loss" in p]
    assert [p["loss"] for p in train] == [f"{r['loss']:.4g}" for r in lines(tmp_path, "loss")]
    assert [p["learning_rate"] for p in train] == [f"{r['lr']:.4g}" for r in lines(tmp_path, "loss")]
    [evaluation] = [p for p in printed if "eval_loss" in p]
    assert evaluation["eval_loss"] == f"{lines(tmp_path, 'eval_loss')[-1]['eval_loss']:.4g}"


class SaveThenStop(transformers.TrainerCallback):
    """Written as transformers' TrainerCallback documentation shows: reads args and state, sets control, returns it."""

    def __init__(self):
        self.seen, self.logged, self.saved, self.evaluated = {}, [], [], []

    def on_train_begin(self, args, state, control, **kwargs):
        self.seen.update(
            output_dir=args.output_dir,
            logging_steps=args.logging_steps,
            eval_steps=args.eval_steps,
            metric=args.metric_for_best_model,
            batch=args.per_device_train_batch_size,
            lr=args.learning_rate,
            max_steps=state.max_steps,
            model=kwargs["model"],
            optimizer=kwargs["optimizer"],
        )

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            control.should_save = True
        if state.global_step == 5:
            control.should_training_stop = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:
            self.logged.append((state.global_step, logs["loss"], state.log_history[-1]["learning_rate"]))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.evaluated.append((state.global_step, metrics["eval_loss"]))

    def on_save(self, args, state, control, **kwargs):
        self.saved.append(state.global_step)


def test_a_callback_written_against_transformers_docs_steers_the_run(tmp_path):
    callback = SaveThenStop()
    cfg = tiny_config(tmp_path, train__max_steps=10, train__eval_every=4, train__log_every=3)
    trainer = Trainer(cfg, callbacks=[callback])
    state = trainer.train()
    run = tmp_path / "run"

    assert callback.seen == dict(
        output_dir=str(run),
        logging_steps=3,
        eval_steps=4,
        metric="eval_loss",
        batch=2,
        lr=1e-3,
        max_steps=10,
        model=trainer.parts.model,
        optimizer=trainer.parts.optimizer,
    )
    assert state.step == 5 and callback.saved == [2, 5]  # the save it asked for, then the save on stopping
    assert (run / "checkpoint-2").is_dir() and (run / "checkpoint-5").is_dir()
    assert callback.logged == [(r["step"], r["loss"], r["lr"]) for r in lines(tmp_path, "loss")]
    assert callback.evaluated == [(4, lines(tmp_path, "eval_loss")[1]["eval_loss"])]
