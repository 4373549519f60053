"""What a user sees when something goes wrong or is shortened: one clear line, nothing lost."""

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import tiny_config
from tests.test_cli import run_cli, tiny_args
from trainer.bench.runner import BenchError, run_bench
from trainer.metrics import read_metrics


def test_generate_help_shows_the_defaults():
    proc = run_cli("generate", "--help")
    assert proc.returncode == 0
    for default in ("(default: 64)", "(default: 0.0)", "(default: 1.0)", "(default: auto)"):
        assert default in proc.stdout


def test_warnings_print_as_one_line_without_source(tmp_path):
    proc = run_cli("train", *tiny_args(tmp_path, train__max_steps=2, optim__name="galore_adamw"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    warning = [line for line in proc.stderr.splitlines() if "galore_rank" in line]
    assert len(warning) == 1 and warning[0].startswith("warning: optim.galore_rank=128 is larger")
    assert ".py:" not in proc.stderr  # no file and line number, no source line


@pytest.mark.slow
def test_a_second_ctrl_c_says_what_was_saved_and_how_to_resume(tmp_path):
    args = tiny_args(tmp_path, train__max_steps=100000, train__seq_len=64, train__log_every=1, checkpoint__save_every=2)
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer", "train", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run = tmp_path / "run"
    deadline = time.time() + 60
    while time.time() < deadline and not list(run.glob("checkpoint-*")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    # The second Ctrl-C goes as soon as the first is acknowledged: the run must still be finishing its step or save.
    while (line := proc.stdout.readline()) and not line.startswith("received SIGINT"):
        pass
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("interrupted at step ") and "nothing was saved for it" in last_line
    assert "--checkpoint.resume_from=latest" in last_line and "checkpoint-" in last_line
    assert "Traceback" not in err


def test_bench_refuses_to_replace_an_earlier_bench_json(tmp_path):
    cfg = tiny_config(tmp_path, train__max_steps=4, bench__warmup_steps=1)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "bench.json").write_text('{"earlier": true}')
    with pytest.raises(BenchError, match="already holds a bench.json.*overwrite=true"):
        run_bench(cfg)
    assert (tmp_path / "run" / "bench.json").read_text() == '{"earlier": true}'


def test_tokens_per_s_in_metrics_is_measured_over_each_read_back(tmp_path):
    from trainer import Trainer

    Trainer(tiny_config(tmp_path, train__max_steps=6, train__log_every=3)).train()
    steps = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert steps[0]["tokens_per_s"] == steps[2]["tokens_per_s"] != steps[3]["tokens_per_s"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--train.log_every=0"], "train.log_every must be > 0, got 0"),
        (["--train.max_nonfinite_steps=0"], "train.max_nonfinite_steps must be > 0, got 0"),
        (["FOLDER"], "is a folder; pass a .toml file"),
    ],
)
def test_more_user_errors_give_one_line_and_exit_2(tmp_path, args, message):
    args = [str(tmp_path) if a == "FOLDER" else a for a in args]
    base = [] if args[0] == str(tmp_path) else tiny_args(tmp_path)
    proc = run_cli("train", *base, *args, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


def test_a_tile_count_that_does_not_divide_seq_len_is_one_line_before_anything_is_read(tmp_path):
    proc = run_cli("train", *tiny_args(tmp_path), "--parallel.tiled_mlp=3", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == (
        "error: parallel.tiled_mlp=3 does not divide train.seq_len=32 into equal tiles; "
        "use 2 or 4 (the nearest divisors of 32)"
    ), proc.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()  # nothing read or written


def test_a_run_without_validation_data_says_it_will_not_be_evaluated(tmp_path, capsys):
    from trainer import Trainer

    Trainer(tiny_config(tmp_path, train__max_steps=2, data__val_fraction=0.0)).train()
    assert "no validation data (data.val_fraction=0.0" in capsys.readouterr().out


def test_the_smoothed_loss_curve_does_not_lag():
    from trainer.plot import centered_mean

    ramp = [10.0 - 0.1 * step for step in range(60)]  # a steadily falling loss
    assert centered_mean(ramp, window=7) == pytest.approx(ramp)  # an exponential average would trail it
    noisy = [1.0, 3.0] * 30
    smoothed = centered_mean(noisy, window=9)
    assert all(abs(v - 2.0) < 0.12 for v in smoothed[4:-4]) and smoothed[0] == 1.0 and smoothed[-1] == 3.0


def test_a_text_field_that_is_not_a_string_names_its_type_and_the_key(tmp_path):
    from trainer.data import DataError, prepare_data

    (tmp_path / "docs.jsonl").write_text('{"text": "fine"}\n{"text": 42}\n')
    with pytest.raises(DataError) as error:
        prepare_data(str(tmp_path / "docs.jsonl"), tokenizer="byte", cache_dir=str(tmp_path / "cache"))
    assert "line 2: field 'text' holds a value of type int, expected a string" in str(error.value)


def hf_folder_without_weights(tmp_path):
    from trainer.models import build, save_hf

    folder = tmp_path / "pretrained"
    save_hf(build("tiny", vocab_size=320), folder)
    (folder / "model.safetensors").unlink()
    return folder


def hf_folder_with_config(tmp_path, **changes):
    from trainer.models import build, save_hf

    folder = tmp_path / "pretrained"
    save_hf(build("tiny", vocab_size=320), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


@pytest.mark.parametrize(
    "make_overrides, message",
    [
        (lambda tmp: {"train__output_dir": "/proc/no-such-process/run"}, "cannot be created in '/proc'"),
        (lambda tmp: {"train__output_dir": "/sys/run"}, "cannot be created in '/sys'"),
        (
            lambda tmp: {"model__from_hf": str(hf_folder_without_weights(tmp))},
            "has no model.safetensors (nor a model.safetensors.index.json): its weights are missing",
        ),
        (
            lambda tmp: {"model__from_hf": str(hf_folder_with_config(tmp, architectures=["GPTNeoXForCausalLM"]))},
            "architecture 'GPTNeoXForCausalLM' is not supported",
        ),
        (  # a config feature the trainer does not implement
            lambda tmp: {
                "model__from_hf": str(hf_folder_with_config(tmp, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
            },
            "rope scaling type 'yarn' is not supported; supported: default, linear, llama3",
        ),
        (
            lambda tmp: {"model__from_hf": str(hf_folder_with_config(tmp, hidden_act="gelu"))},
            "LlamaForCausalLM with hidden_act='gelu' is not supported; only silu",
        ),
    ],
)
def test_paths_and_checkpoints_are_checked_before_the_corpus_is_tokenized(tmp_path, make_overrides, message):
    overrides = {"model__preset": "small", "model__allow_new_tokenizer": True, **make_overrides(tmp_path)}
    proc = run_cli("train", *tiny_args(tmp_path, **overrides), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "cache").exists()  # nothing was tokenized


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "NOWHERE"], "eval: 'NOWHERE' does not exist; pass a run's final or checkpoint-<step> folder"),
        (["eval", "FILE"], "eval: 'FILE' is a file, not a folder"),
        (["generate", "NOWHERE", "--prompt", "hi"], "generate: 'NOWHERE' does not exist; pass a run's final"),
    ],
)
def test_eval_and_generate_of_a_path_that_is_not_a_folder_say_so(tmp_path, args, message):
    (tmp_path / "file.txt").write_text("not a model\n")
    where = {"NOWHERE": str(tmp_path / "no-such-run"), "FILE": str(tmp_path / "file.txt")}
    proc = run_cli(*[where.get(a, a) for a in args], cwd=tmp_path)
    for name, path in where.items():
        message = message.replace(name, path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), proc.stderr


def test_bitsandbytes_hub_kernel_warning_is_kept_out_of_a_runs_output():
    # What bitsandbytes logs at import on a CPU with AVX512-BF16 when the hub kernel cannot be had;
    # this machine may lack that CPU feature, so the record is sent through bitsandbytes' own logger.
    code = (
        "import logging, trainer; logging.basicConfig(); "
        "log = logging.getLogger('bitsandbytes.backends.cpu.ops'); "
        "log.warning('Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
        "already `pip install kernels`', 'trust_remote_code=True is needed'); "
        "log.warning('another bitsandbytes warning')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "kernels-community" not in proc.stderr and "another bitsandbytes warning" in proc.stderr
