"""Between log steps a training step reads nothing back from the device.

On CPU there is no device to wait for, so the test counts the calls that would wait on a GPU:
Tensor.item, tolist, __bool__, __float__, __int__, cpu and numpy, made by the training thread
while a step runs (the batch-building thread only ever touches host tensors).
"""

import threading

import pytest
import torch

from tests.helpers import tiny_config
from trainer import Trainer
from trainer.callbacks import TrainerCallback

HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")


class CountHostReads(TrainerCallback):
    """Host reads made by the training thread during each step (on_step_begin .. on_step_end)."""

    def __init__(self, monkeypatch):
        self.per_step: dict[int, int] = {}
        self.counting = False
        self.count = 0
        main = threading.main_thread()
        for name in HOST_READS:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                if self.counting and threading.current_thread() is main:
                    self.count += 1
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)

    def on_step_begin(self, config, state, control, **kwargs):
        self.count, self.counting = 0, True

    def on_step_end(self, config, state, control, **kwargs):
        self.counting = False
        self.per_step[state.step] = self.count

    def on_log(self, config, state, control, logs=None, **kwargs):
        self.per_step.setdefault("read back at", set()).add(state.step)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"train__grad_accum_steps": 3},
        {"train__dtype": "bf16"},
        {"train__max_grad_norm": 0.0},
    ],
)
def test_no_host_read_between_log_steps(tmp_path, monkeypatch, overrides):
    counter = CountHostReads(monkeypatch)
    cfg = tiny_config(tmp_path, train__max_steps=12, train__log_every=4, **overrides)
    Trainer(cfg, callbacks=[counter]).train()
    reads = {step: n for step, n in counter.per_step.items() if isinstance(step, int)}
    assert set(reads) == set(range(1, 13))
    assert all(n == 0 for n in reads.values()), reads  # the read-back comes after on_step_end
    assert counter.per_step["read back at"] == {4, 8, 12}


def test_the_counter_sees_a_host_read(tmp_path, monkeypatch):
    """The counter itself works: a step that reads the loss back is seen."""
    counter = CountHostReads(monkeypatch)

    class ReadsTheLoss(TrainerCallback):
        def on_step_end(self, config, state, control, **kwargs):
            if state.step == 2:
                torch.ones(()).item()

    Trainer(tiny_config(tmp_path, train__max_steps=3, train__log_every=3), callbacks=[ReadsTheLoss(), counter]).train()
    assert counter.per_step[2] == 1 and counter.per_step[1] == counter.per_step[3] == 0


def test_an_optimizer_without_found_inf_reads_one_flag_per_step(tmp_path, monkeypatch):
    counter = CountHostReads(monkeypatch)
    Trainer(
        tiny_config(tmp_path, train__max_steps=4, train__log_every=4, optim__name="galore_adamw"), callbacks=[counter]
    ).train()
    assert [counter.per_step[s] for s in (1, 2, 3, 4)] == [1, 1, 1, 1]
