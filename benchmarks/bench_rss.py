"""A CPU run's resident memory against the planner's "process (RSS)" figure, and the fit behind it.

    python benchmarks/bench_rss.py [--json rss.json] [--steps 4]

Each case trains `steps` steps in a fresh process (python benchmarks/bench_rss.py --one CASE): the
trainer's modules imported (as `python -m trainer train` has them), VmHWM reset (/proc/self/clear_refs)
and VmRSS read just before the Trainer is built, VmHWM read at the end of each step
(trainer.plan.measure.measure_training_rss). The growth, VmHWM at the last step minus VmRSS before,
is set against the planner's figures for the same run: the tensors' peak (what the CPU allocator
sees: predict_peak) and the bytes the replayed step allocates in all (Tape.allocated). The least-
squares fit growth = build + a x peak + b x allocated (+ bitsandbytes' libraries) over the cases,
with each case's error left out of its own fit, is printed beside the constants
trainer/plan/devices.py uses (RSS_*), so they can be checked or replaced. Linux only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIB = 2**20
SMALL = {"model.preset": "small"}
WIDE = {  # 6 layers of width 768, a 32,000-token vocabulary: tensors above glibc's 32 MiB mmap ceiling
    "model.preset": "small",
    "model.hidden_size": 768,
    "model.n_heads": 12,
    "model.n_kv_heads": 12,
    "model.intermediate_size": 2048,
    "model.n_layers": 6,
    "model.vocab_size": 32000,
}
CASES = [
    {"model.preset": "tiny"},
    {"model.preset": "tiny", "parallel.activation_checkpointing": "full"},
    {"model.preset": "tiny", "train.micro_batch_size": 4, "train.seq_len": 512},
    {
        "model.preset": "tiny",
        "train.micro_batch_size": 4,
        "train.seq_len": 512,
        "parallel.activation_checkpointing": "full",
    },
    {
        "model.preset": "tiny",
        "train.micro_batch_size": 4,
        "train.seq_len": 512,
        "parallel.activation_checkpointing": "selective",
    },
    {**SMALL, "train.micro_batch_size": 4, "train.seq_len": 256},
    {**SMALL, "train.micro_batch_size": 4, "train.seq_len": 256, "parallel.activation_checkpointing": "full"},
    {**SMALL, "train.micro_batch_size": 4, "train.seq_len": 256, "optim.name": "adamw8bit"},
    {
        **SMALL,
        "train.micro_batch_size": 4,
        "train.seq_len": 256,
        "optim.name": "adamw8bit",
        "parallel.activation_checkpointing": "full",
    },
    {**SMALL, "train.micro_batch_size": 4, "train.seq_len": 1024},
    {**SMALL, "train.micro_batch_size": 4, "train.seq_len": 1024, "parallel.activation_checkpointing": "full"},
    {**SMALL, "train.micro_batch_size": 4, "train.seq_len": 1024, "parallel.activation_checkpointing": "selective"},
    {**SMALL, "train.micro_batch_size": 8, "train.seq_len": 1024},
    {**SMALL, "train.micro_batch_size": 8, "train.seq_len": 1024, "parallel.activation_checkpointing": "full"},
    {**SMALL, "train.micro_batch_size": 3, "train.seq_len": 1000, "train.dtype": "bf16"},
    {**WIDE, "train.micro_batch_size": 2, "train.seq_len": 512},
    {**WIDE, "train.micro_batch_size": 2, "train.seq_len": 512, "parallel.activation_checkpointing": "full"},
]


def config_for(case: dict, folder: Path, steps: int):
    from tests.helpers import tiny_config

    return tiny_config(
        folder,
        **{
            "train.max_steps": steps,
            "train.eval_every": 0,
            "train.eval_batches": 1,
            "train.progress": "none",
            "checkpoint.save_every": 0,
            **case,
        },
    )


def measure_one(case: dict, steps: int) -> dict:
    """In this (fresh) process: the run's RSS before it is built and at the end of each step."""
    import trainer.loop  # noqa: F401  (the trainer's modules resident first, as under python -m trainer train)
    from trainer.plan.measure import measure_training_rss

    with tempfile.TemporaryDirectory() as tmp:
        m = measure_training_rss(config_for(case, Path(tmp), steps))
    return {"before_bytes": m.before_bytes, "peak_bytes": m.peak_bytes, "step_peaks": m.step_peaks}


def measure_in_fresh_process(case: dict, steps: int) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--one", json.dumps(case), "--steps", str(steps)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise RuntimeError(f"case {case} failed: {done.stderr[-2000:]}")
    return json.loads(lines[-1])


def planned(case: dict, steps: int) -> dict:
    """The planner's figures for the case: the tensors' peak, the step's allocations, the RSS."""
    from trainer.plan.predict import predict_peak, replay, run_setting, uses_bitsandbytes

    with tempfile.TemporaryDirectory() as tmp:
        config = config_for(case, Path(tmp), steps)
        s, _ = run_setting(config, device="cpu")
        tape, _ = replay(s)
        plan = predict_peak(config, device="cpu")
    return {
        "tensor_peak_bytes": tape.peak.bytes,
        "allocated_bytes": tape.allocated,
        "bitsandbytes": uses_bitsandbytes(s),
        "rss_bytes": plan.rss_bytes,
    }


def fit(rows: list[dict]) -> tuple[list[float], list[float]]:
    """Least squares of growth on (1, peak, allocated, bitsandbytes), and each case's error left out."""
    import numpy as np

    x = np.array(
        [[1.0, r["tensor_peak_bytes"] / MIB, r["allocated_bytes"] / MIB, float(r["bitsandbytes"])] for r in rows]
    )
    y = np.array([r["growth_bytes"] / MIB for r in rows])
    coef = np.linalg.lstsq(x, y, rcond=None)[0]
    left_out = []
    for i in range(len(rows)):
        keep = np.arange(len(rows)) != i
        c = np.linalg.lstsq(x[keep], y[keep], rcond=None)[0]
        left_out.append(float(x[i] @ c / y[i] - 1))
    return [float(v) for v in coef], left_out


def label(case: dict) -> str:
    c = dict(case)
    name = c.pop("model.preset")
    if "model.hidden_size" in c:
        name = "wide"
        for key in list(WIDE):
            c.pop(key, None)
    parts = [name]
    if "train.micro_batch_size" in c:
        parts.append(f"{c.pop('train.micro_batch_size')} x {c.pop('train.seq_len')}")
    parts += [f"{k.split('.')[-1]}={v}" for k, v in c.items()]
    return ", ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write the cases and the fit here")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(json.loads(args.one), args.steps)))
        return 0
    from trainer.plan import devices

    rows = []
    for case in CASES:
        measured = measure_in_fresh_process(case, args.steps)
        row = {"case": label(case), **planned(case, args.steps), **measured}
        row["growth_bytes"] = row["peak_bytes"] - row["before_bytes"]
        row["predicted_growth_bytes"] = row["rss_bytes"] - devices.CPU_RUNTIME_BYTES
        rows.append(row)
        print(
            f"{row['case']}: growth {row['growth_bytes'] / MIB:.0f} MiB, predicted "
            f"{row['predicted_growth_bytes'] / MIB:.0f} MiB",
            file=sys.stderr,
            flush=True,
        )
    coef, left_out = fit(rows)
    print(
        "| case | tensors, planned | allocated in the step, planned | RSS growth, measured | RSS growth, "
        "predicted | predicted / measured | process peak RSS, measured | process (RSS), predicted |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['case']} | {r['tensor_peak_bytes'] / MIB:,.1f} MiB | {r['allocated_bytes'] / MIB:,.0f} MiB "
            f"| {r['growth_bytes'] / MIB:,.0f} MiB | {r['predicted_growth_bytes'] / MIB:,.0f} MiB "
            f"| {r['predicted_growth_bytes'] / r['growth_bytes']:.2f} | {r['peak_bytes'] / MIB:,.0f} MiB "
            f"| {r['rss_bytes'] / MIB:,.0f} MiB |"
        )
    print(
        f"\nfit over these cases: build {coef[0]:.0f} MiB + {coef[1]:.3f} x tensors + {coef[2]:.3f} x allocated "
        f"+ {coef[3]:.0f} MiB with bitsandbytes; each case left out of its own fit: largest error "
        f"{max(abs(e) for e in left_out):.1%}"
    )
    print(
        f"in use (trainer/plan/devices.py): build {devices.RSS_BUILD_BYTES / MIB:.0f} MiB + "
        f"{devices.RSS_PEAK_FACTOR} x tensors + {devices.RSS_CHURN_FACTOR} x allocated + "
        f"{devices.RSS_BITSANDBYTES_BYTES / MIB:.0f} MiB with bitsandbytes"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"cases": rows, "fit": coef, "left_out": left_out}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
