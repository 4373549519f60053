"""The progress a run prints: the time left and tokens/s of each line measure what they say."""

from __future__ import annotations

import re
import time

import pytest

from tests.helpers import tiny_config
from trainer import Trainer
from trainer.callbacks import TrainerCallback
from trainer.metrics import Throughput


def test_time_per_step_is_the_first_windows_until_a_steady_window_replaces_it(monkeypatch):
    clock = iter([100.0, 120.0, 130.0, 136.0])  # start, then the end of each of three windows
    monkeypatch.setattr("trainer.metrics.time.perf_counter", lambda: next(clock))
    throughput = Throughput(tokens_per_step=50)
    assert throughput.seconds_per_step is None
    assert throughput.window(10) == pytest.approx(25.0)  # 10 steps x 50 tokens in 20 s, start-up included
    assert throughput.warming_up and throughput.seconds_per_step == pytest.approx(2.0)
    throughput.window(10)
    assert not throughput.warming_up and throughput.seconds_per_step == pytest.approx(1.0)
    throughput.window(10)
    assert throughput.seconds_per_step == pytest.approx(0.8)  # 16 s over the 20 steady steps


class SlowSteps(TrainerCallback):
    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_step_end(self, config, state, control, **kwargs):
        time.sleep(self.seconds)


def eta_seconds(line: str) -> int:
    minutes, seconds = re.search(r"eta (\d+)m(\d\d)s", line).groups()
    return 60 * int(minutes) + int(seconds)


def test_progress_lines_come_at_log_steps_with_the_time_left_from_the_steps_so_far(tmp_path, capsys):
    cfg = tiny_config(tmp_path, train__max_steps=12, train__log_every=4, train__progress="lines")
    Trainer(cfg, callbacks=[SlowSteps(0.25)]).train()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split(" |")[0] for line in lines] == ["step 4/12", "step 8/12", "step 12/12"]
    # At step 4 (the first read-back) 8 steps of at least 0.25 s are left: at least 2 s, never 0.
    assert eta_seconds(lines[0]) >= 2 and "tok/s (warm-up)" in lines[0]
    assert eta_seconds(lines[1]) >= 1 and "(warm-up)" not in lines[1]
    assert eta_seconds(lines[2]) == 0
