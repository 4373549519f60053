"""The single-GPU memory ladder's rungs on and off: step time and peak memory, side by side.

    python benchmarks/bench_ladder.py                      # small preset, 2 x 1024 tokens, on this CPU
    python benchmarks/bench_ladder.py --json ladder.json   # and the figures as JSON

Each setting trains the same model on the same batches (small preset, byte tokenizer, fp32 on
CPU): tiled MLP (parallel.tiled_mlp) and activation offloading (parallel.activation_offloading)
each on and off, alone and under full activation checkpointing. Step times: the settings run
round-robin, `--rounds` times, `--steps` timed steps each after one warm-up step, all in this one
process, and each setting's median and fastest step are reported (interleaving spreads a busy
machine's slow moments over every setting; the fastest step is the least disturbed). Peak memory:
a separate two-step run per setting under the CPU allocator's recorder (trainer/plan/measure.py),
beside the planner's prediction. On CPU offloading moves nothing (the hooks pass each tensor
through): its time is the hooks' own cost, its memory that of the run without it; what it saves
on a GPU needs a GPU run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.helpers import write_corpus  # noqa: E402  (after the repository is on the path)
from trainer.callbacks import TrainerCallback  # noqa: E402

SETTINGS = [
    ("baseline", {}),
    ("tiled_mlp=4", {"parallel.tiled_mlp": 4}),
    ("activation_offloading", {"parallel.activation_offloading": True}),
    ("full checkpointing", {"parallel.activation_checkpointing": "full"}),
    ("full + tiled_mlp=4", {"parallel.activation_checkpointing": "full", "parallel.tiled_mlp": 4}),
    (
        "full + activation_offloading",
        {"parallel.activation_checkpointing": "full", "parallel.activation_offloading": True},
    ),
]


class StepTimes(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, config, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, config, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def config_for(folder: Path, corpus: Path, overrides: dict, steps: int, args):
    from trainer.config import load_config

    values = {
        "model.preset": "small",
        "data.path": str(corpus),
        "data.tokenizer": "byte",
        "data.val_fraction": 0.05,
        "data.cache_dir": str(folder.parent / "cache"),
        "train.output_dir": str(folder),
        "train.overwrite": True,
        "train.max_steps": steps,
        "train.micro_batch_size": args.micro_batch,
        "train.seq_len": args.seq_len,
        "train.dtype": "fp32",
        "train.device": "cpu",
        "train.progress": "none",
        "train.eval_every": 0,
        "train.eval_batches": 1,
        "train.threads": args.threads,
        "optim.warmup_steps": 1,
        **overrides,
    }
    return load_config(None, values)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from trainer import Trainer
    from trainer.plan import predict_peak
    from trainer.plan.measure import measure_training_peak

    tmp = Path(tempfile.mkdtemp(prefix="bench-ladder-"))
    corpus = write_corpus(tmp / "corpus", n_docs=48, words_per_doc=1500)
    times: dict[str, list[float]] = {label: [] for label, _ in SETTINGS}
    for _ in range(args.rounds):
        for i, (label, overrides) in enumerate(SETTINGS):
            timer = StepTimes()
            Trainer(config_for(tmp / f"run{i}", corpus, overrides, 1 + args.steps, args), callbacks=[timer]).train()
            times[label] += timer.times[1:]  # the first step warms the allocator and caches up
    rows = []
    for i, (label, overrides) in enumerate(SETTINGS):
        config = config_for(tmp / f"mem{i}", corpus, overrides, 2, args)
        measured = measure_training_peak(config).peak_bytes
        predicted = predict_peak(config, device="cpu").peak_bytes
        rows.append(
            {
                "setting": label,
                "step_s_median": statistics.median(times[label]),
                "step_s": times[label],
                "measured_peak_bytes": measured,
                "predicted_peak_bytes": predicted,
            }
        )
    base = rows[0]["step_s_median"]
    header = f"small preset, {args.micro_batch} x {args.seq_len} tokens, fp32, {args.threads} threads, on {cpu_name()}"
    print(header)
    fastest = min(rows[0]["step_s"])
    columns = [("setting", -32), ("step (median)", 14), ("vs baseline", 12), ("fastest", 9), ("vs baseline", 12)]
    columns += [("peak (measured)", 17), ("planned", 11)]
    print("".join(f"{name:<{-w}}" if w < 0 else f"{name:>{w}}" for name, w in columns))
    for r in rows:
        print(
            f"{r['setting']:<32}{r['step_s_median']:>13.3f}s{r['step_s_median'] / base:>11.2f}x"
            f"{min(r['step_s']):>8.3f}s{min(r['step_s']) / fastest:>11.2f}x"
            f"{r['measured_peak_bytes'] / 2**20:>14.1f} MiB{r['predicted_peak_bytes'] / 2**20:>7.1f} MiB"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"machine": cpu_name(), "settings": vars(args) | {"json": None}, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
