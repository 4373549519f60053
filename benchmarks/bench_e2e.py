"""End-to-end equal-loss runs (pytest-benchmark): `python -m trainer bench` once per setting.

Each case runs the bench command on one model: the eager PyTorch reference and the case's setting,
each side in its own process, from one initialisation on one data order, and asserts that the losses
pass bench's criterion (trainer/bench/verdict.py). pytest-benchmark times the whole command, once (a run is
minutes on a real model); the figures that matter are in each case's extra_info, taken from
bench.json: tokens/s and peak memory of every side, speed-up and memory ratio against the reference
(and the peer), MFU on GPU, the loss verdict. Named bench_*, so `pytest tests/` never collects it.

    python -m pytest benchmarks/bench_e2e.py --benchmark-json=e2e.json
    BENCH_E2E_PRESET=llama-1b BENCH_E2E_STEPS=20 python -m pytest benchmarks/bench_e2e.py -k bf16

Environment: BENCH_E2E_PRESET (default small), BENCH_E2E_STEPS (default 8 on CPU, 20 on GPU),
BENCH_E2E_SEQ_LEN (256), BENCH_E2E_BATCH (8), BENCH_E2E_RECORD (a JSONL file each finished case
appends its extra_info to, so a run cut short still leaves the cases it finished). The corpus is
the built-in one with the byte tokenizer: no tokenizer training, and throughput does not depend on
what the tokens are. CPU cases run everywhere; the others need CUDA and compiled Triton.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
PRESET = os.environ.get("BENCH_E2E_PRESET", "small")
STEPS = int(os.environ.get("BENCH_E2E_STEPS", "20" if ON_GPU else "8"))
SEQ_LEN = int(os.environ.get("BENCH_E2E_SEQ_LEN", "256"))
BATCH = int(os.environ.get("BENCH_E2E_BATCH", "8"))


def needs(*modules, gpu=True):
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    reasons = [f"needs {', '.join(missing)}"] if missing else []
    if gpu and not ON_GPU:
        reasons.append("needs CUDA and compiled Triton (TRITON_INTERPRET unset)")
    return pytest.mark.skipif(bool(reasons), reason="; ".join(reasons))


# (id, bench overrides, marks): every case is judged against the eager fp32 reference.
CASES = [
    ("fp32-kernels", ["--train.dtype=fp32"], needs(gpu=False)),
    ("fp32-kernels-peer-hf", ["--train.dtype=fp32", "--bench.peer=hf"], needs("transformers", gpu=False)),
    ("bf16-kernels", ["--train.dtype=bf16"], needs()),
    ("bf16-compile", ["--train.dtype=bf16", "--parallel.compile=true"], needs()),
    ("bf16-selective-checkpointing", ["--train.dtype=bf16", "--parallel.activation_checkpointing=selective"], needs()),
    ("bf16-adamw8bit", ["--train.dtype=bf16", "--optim.name=adamw8bit"], needs("bitsandbytes")),
    ("bf16-galore", ["--train.dtype=bf16", "--optim.name=galore_adamw"], needs()),
    ("bf16-peer-hf-liger", ["--train.dtype=bf16", "--bench.peer=hf-liger"], needs("transformers", "liger_kernel")),
]


def run_bench_command(output_dir: Path, overrides: list[str]) -> tuple[int, dict]:
    args = [
        sys.executable,
        "-m",
        "trainer",
        "bench",
        f"--model.preset={PRESET}",
        "--data.tokenizer=byte",
        f"--train.max_steps={STEPS}",
        f"--train.seq_len={SEQ_LEN}",
        f"--train.micro_batch_size={BATCH}",
        f"--train.output_dir={output_dir}",
        "--train.progress=none",
        "--bench.warmup_steps=3",
        *overrides,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(args, cwd=ROOT, env=env)
    report_file = output_dir / "bench.json"
    return proc.returncode, json.loads(report_file.read_text()) if report_file.is_file() else {}


def figures(report: dict) -> dict:
    """The numbers a reader compares, from bench.json, without the per-step lists."""
    keep = (
        "tokens_per_s",
        "peak_mem_bytes",
        "mfu",
        "dtype",
        "optimized_speedup",
        "optimized_memory_ratio",
        "max_rel_loss_diff",
    )
    out = {
        side: {k: v for k, v in report[side].items() if k in keep}
        for side in ("reference", "optimized", "peer")
        if side in report
    }
    out.update(
        {
            k: report.get(k)
            for k in (
                "speedup",
                "memory_ratio",
                "max_rel_loss_diff",
                "tolerance",
                "passed",
                "env",
                "model",
                "steps",
                "tokens_per_step",
            )
        }
    )
    return out


@pytest.mark.parametrize("overrides", [pytest.param(o, id=name, marks=m) for name, o, m in CASES])
def test_bench_e2e(benchmark, tmp_path, request, overrides):
    results = {}

    def run():
        results["exit"], results["report"] = run_bench_command(tmp_path / "bench", overrides)

    benchmark.pedantic(run, rounds=1, iterations=1)
    report = results["report"]
    assert report, f"bench wrote no bench.json (exit code {results['exit']})"
    info = {"case": request.node.callspec.id, "preset": PRESET, "command_overrides": overrides, **figures(report)}
    benchmark.extra_info.update(info)
    if os.environ.get("BENCH_E2E_RECORD"):
        with open(os.environ["BENCH_E2E_RECORD"], "a") as f:
            f.write(json.dumps(info) + "\n")
    assert results["exit"] == 0 and report["passed"], report.get("criterion")
