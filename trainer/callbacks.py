"""Callbacks with the events a Hugging Face Trainer user knows, and the state they see."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class TrainerState:
    """Saved with each checkpoint (trainer_state.json)."""

    step: int = 0  # optimizer steps done
    max_steps: int = 0
    epoch: float = 0.0
    tokens_seen: int = 0  # label tokens over all ranks
    best_metric: float | None = None  # lowest eval_loss so far
    best_checkpoint: str | None = None
    nonfinite_steps: int = 0  # steps skipped for a non-finite loss or gradient
    log_history: list[dict] = field(default_factory=list)
    runtime_s: float = 0.0  # seconds of training, over every session of a resumed run
    tracker_runs: dict[str, str] = field(default_factory=dict)  # {train.report_to backend: its run id}, to resume

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainerState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class TrainerControl:
    """Set by callbacks; the loop reads and resets it after each event."""

    should_training_stop: bool = False
    should_save: bool = False
    should_evaluate: bool = False


class TrainerCallback:
    """Override the events you need. Each gets (config, state, control, **kwargs)."""

    def on_train_begin(self, config, state, control, **kwargs): ...
    def on_train_end(self, config, state, control, **kwargs): ...
    def on_step_begin(self, config, state, control, **kwargs): ...
    def on_step_end(self, config, state, control, **kwargs): ...
    def on_log(self, config, state, control, logs=None, **kwargs): ...
    def on_evaluate(self, config, state, control, metrics=None, **kwargs): ...
    def on_save(self, config, state, control, checkpoint=None, **kwargs): ...


class CallbackList:
    def __init__(self, callbacks):
        self.callbacks = list(callbacks)

    def fire(self, event: str, config, state, control, **kwargs) -> TrainerControl:
        for cb in self.callbacks:
            getattr(cb, event)(config, state, control, **kwargs)
        return control
