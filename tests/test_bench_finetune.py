"""benchmarks/bench_finetune.py through its entry point: its figures agree with one another.

Never timing: only what must hold whatever the machine (LoRA trains fewer weights than full
fine-tuning, 8-bit states are smaller than fp32 ones, a 4-bit base is smaller than an fp32 one, ...).
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import write_corpus

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_finetune.py"
OPTIONS = ["adamw", "adamw8bit", "galore_adamw8bit_layerwise", "apollo_adamw", "lora_r16", "qlora_r16"]
FULL = OPTIONS[:4]


def bench(*args, cwd):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd, timeout=900)


@pytest.mark.parametrize(
    "args, says",
    [
        (["--options", "adamw,sgd"], "unknown option sgd"),
        (["--options", ","], "unknown option (none given)"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--steps", "many"], "invalid int value"),
        (["--threads", "-1"], "--threads must be >= 0"),
        (["--quick", "--predict-only"], "do not go together"),
        (["--json", "/no/such/folder/out.json"], "does not exist"),
        (["--frobnicate"], "unrecognized arguments"),
    ],
)
def test_bad_arguments_exit_with_one_line(tmp_path, args, says):
    proc = bench(*args, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], proc.stderr
    assert proc.stdout == ""


def test_data_that_does_not_exist_is_one_line(tmp_path):
    proc = bench("--quick", "--data", str(tmp_path / "missing"), "--workdir", str(tmp_path / "work"), cwd=tmp_path)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data.path entry") and "Traceback" not in proc.stderr, proc.stderr


def test_llama_8b_predictions(tmp_path):
    out = tmp_path / "pred.json"
    proc = bench("--predict-only", "--json", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert "cpu" not in report
    rows = {r["name"]: r for r in report["llama_8b"]["results"]}
    assert list(rows) == OPTIONS
    # Llama-3-8B's parameters; rank 16 on q, k, v, o, gate, up and down of its 32 layers: 41,943,040.
    for name in FULL:
        assert rows[name]["trainable_params"] == rows[name]["parameters"] == 8_030_261_248
    assert rows["lora_r16"]["trainable_params"] == rows["qlora_r16"]["trainable_params"] == 41_943_040
    cards = report["llama_8b"]["cards"]
    for r in rows.values():
        parts = r["weights_bytes"] + r["gradients_bytes"] + r["optimizer_states_bytes"]
        assert parts + r["activations_and_temporaries_bytes"] == r["peak_bytes"]
        for card, budget in cards.items():
            assert r["fits"][card] == (r["required_bytes"][card] <= budget)
            assert r["required_bytes"][card] > r["peak_bytes"]  # the CUDA context and slack on top
        assert r["required_bytes_without_checkpointing"] >= r["required_bytes"]["rtx4090-24gb"]
    # Full fine-tuning keeps a gradient per weight and AdamW two moments; 8-bit halves those, the 4-bit base the base.
    assert not rows["adamw"]["fits"]["rtx4090-24gb"]
    assert rows["adamw"]["gradients_bytes"] == rows["adamw"]["weights_bytes"]
    weights = rows["adamw"]["weights_bytes"]
    assert 2 * weights <= rows["adamw"]["optimizer_states_bytes"] < 2 * weights + 4096  # two moments and step counts
    assert rows["adamw8bit"]["optimizer_states_bytes"] < rows["adamw"]["optimizer_states_bytes"] / 1.9
    assert rows["galore_adamw8bit_layerwise"]["gradients_bytes"] < rows["adamw"]["gradients_bytes"] / 10
    assert rows["qlora_r16"]["weights_bytes"] < rows["lora_r16"]["weights_bytes"] / 2
    assert all(rows["qlora_r16"]["fits"].values())
    need = {name: r["required_bytes"]["rtx4090-24gb"] for name, r in rows.items()}
    assert need["qlora_r16"] < need["lora_r16"] < need["apollo_adamw"] < need["adamw8bit"] < need["adamw"]
    assert "RTX 4090" in proc.stdout and "QLoRA r16" in proc.stdout


@pytest.mark.slow
def test_quick_run_figures_agree(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    out = tmp_path / "out.json"
    proc = bench(
        "--quick",
        "--data",
        str(corpus),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--workdir",
        str(tmp_path / "work"),
        "--json",
        str(out),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    cpu = report["cpu"]
    steps = cpu["steps"]
    rows = {r["name"]: r for r in cpu["results"]}
    assert list(rows) == OPTIONS
    full, lora, qlora = rows["adamw"], rows["lora_r16"], rows["qlora_r16"]

    for r in rows.values():
        assert len(r["losses"]) == steps and all(math.isfinite(x) for x in r["losses"])
        assert r["tokens_per_s"] > 0 and r["peak_rss_bytes"] > 0
        assert r["predicted_peak_bytes"] > 0 and r["predicted_rss_bytes"] > r["predicted_peak_bytes"]
        # Every weight and every optimizer state is alive during the recorded steps.
        assert r["live_peak_bytes"] >= r["weight_bytes"] + r["optim_state_bytes"]
        assert r["peak_rss_bytes"] > r["live_peak_bytes"] * 0.5

    # Full fine-tuning trains every weight of the saved model; the same first batch on the same weights.
    for name in FULL:
        r = rows[name]
        assert r["trainable_params"] == full["trainable_params"] == cpu["model"]["parameters"]
        assert r["param_bytes"] == r["weight_bytes"] == 4 * r["trainable_params"]  # fp32
        assert r["first_loss"] == full["first_loss"]
    assert full["grad_bytes"] == full["param_bytes"]
    assert 2 * full["param_bytes"] <= full["optim_state_bytes"] < 2 * full["param_bytes"] + 4096  # two moments, steps
    assert rows["adamw8bit"]["optim_state_bytes"] < full["optim_state_bytes"]
    assert rows["apollo_adamw"]["optim_state_bytes"] < full["optim_state_bytes"]
    assert rows["galore_adamw8bit_layerwise"]["optim_state_bytes"] < full["optim_state_bytes"]
    assert rows["galore_adamw8bit_layerwise"]["grad_bytes"] < full["grad_bytes"]  # one gradient at a time
    assert full["final_loss"] < full["first_loss"]

    # LoRA and QLoRA: the same adapters, far fewer trainable weights, their gradients and AdamW moments only.
    assert lora["trainable_params"] == qlora["trainable_params"] < full["trainable_params"] / 2
    for r in (lora, qlora):
        assert r["param_bytes"] == r["grad_bytes"] == 4 * r["trainable_params"]
        assert 2 * r["param_bytes"] <= r["optim_state_bytes"] < full["optim_state_bytes"]
    assert lora["weight_bytes"] == full["weight_bytes"] + lora["param_bytes"]  # the frozen base plus the adapters
    assert qlora["weight_bytes"] < lora["weight_bytes"]  # the base in 4 bits
    assert lora["first_loss"] == full["first_loss"]  # B starts at zero: the base model's loss
    assert qlora["first_loss"] == pytest.approx(full["first_loss"], rel=0.05)  # the quantized base

    assert "Measured on" in proc.stdout and "QLoRA r16" in proc.stdout
