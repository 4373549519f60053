import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import tiny_config
from trainer.config import to_toml
from trainer.metrics import read_metrics


def run_cli(*args, cwd=None, timeout=120):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "trainer", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env
    )


def tiny_args(tmp_path, **overrides):
    cfg = tiny_config(tmp_path, **overrides)
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    return [str(path)]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--train.max_step=3"], "unknown config key 'train.max_step'; did you mean train.max_steps?"),
        (["--optim.nme=adamw"], "did you mean optim.name?"),
        (["--train.dtype=bf32"], "train.dtype='bf32' is not allowed; choose one of: auto, fp32, bf16, fp16"),
        (["--train.max_steps=many"], "train.max_steps='many' is not valid: expected an integer"),
        (["--data.path=/no/such/corpus"], "data.path entry '/no/such/corpus' matched no files"),
        (["missing.toml"], "config file 'missing.toml' does not exist"),
        (["--train.seq_len=100000"], "train.seq_len=100000 is longer than the model allows"),
        (["--model.preset=huge"], "model.preset='huge' is unknown; choose one of: tiny, small"),
    ],
)
def test_user_errors_give_one_line_and_exit_2(tmp_path, args, message):
    base = tiny_args(tmp_path)
    proc = run_cli("train", *(args if args[0].endswith(".toml") else base + args), cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith("trainer.data:")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


def test_eval_of_a_folder_that_is_no_checkpoint(tmp_path):
    proc = run_cli("eval", str(tmp_path))
    assert proc.returncode == 2 and "is not a checkpoint folder" in proc.stderr and "Traceback" not in proc.stderr


def test_train_then_eval_from_the_command_line(tmp_path):
    proc = run_cli("train", *tiny_args(tmp_path, train__max_steps=3), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    final = tmp_path / "run" / "final"
    proc = run_cli("eval", str(final), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    logged = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval_loss" in r][-1]
    assert f"eval_loss {logged['eval_loss']:.4f}" in proc.stdout


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_continues(tmp_path):
    args = tiny_args(tmp_path, train__max_steps=100000, train__seq_len=64)
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer", "train", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and len(read_metrics(metrics)) < 3:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "checkpoint saved" in out
    last = max(r["step"] for r in read_metrics(metrics))
    checkpoint = tmp_path / "run" / f"checkpoint-{last}"
    assert checkpoint.is_dir()  # at most the step in flight is lost

    proc = run_cli("train", *args, f"--train.max_steps={last + 2}", "--checkpoint.resume_from=latest", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"resumed from {checkpoint} at step {last}" in proc.stdout
    steps = [r["step"] for r in read_metrics(metrics) if "loss" in r]
    assert steps == list(range(1, last + 3))
