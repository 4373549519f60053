"""The optimized model against its eager reference with their steps interleaved in one process.

    python benchmarks/bench_interleaved.py [--sizes tiny,small,100m] [--steps 16] [--json out.json]

`python -m trainer bench` runs each side in a process of its own, one after the other, so that
each peak memory is its own; on a shared 2-core machine a drift of a few percent between the two
runs (other load, memory state) then reads as a difference between the sides. Here both models
(same initial weights, trainer.ops.KernelChoice.eager() against the default choice) take the same
batch, and their training steps (forward, backward, fused AdamW step) alternate, the first side
swapped every step; the figure is the ratio of median step times. Memory is not measured here.
The sizes are bench's in benchmarks/README.md: the tiny and small presets at 8 x 64 and 8 x 256
tokens with bench's vocabulary of 4096, and the ~100M model (hidden 768, 12 layers, untied,
vocabulary 16384) at 2 x 256.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_finetune  # noqa: E402
from trainer.config import DataConfig, OptimConfig  # noqa: E402
from trainer.models import KernelChoice, build  # noqa: E402
from trainer.models.config import PRESETS, ModelArgs  # noqa: E402
from trainer.optim import build_optimizer  # noqa: E402

# bench's tokenizer (the default bpe) has DataConfig().vocab_size tokens: the tiny and small runs'
# vocabulary
BENCH_VOCAB = DataConfig().vocab_size
SIZES = {
    "tiny": (dict(PRESETS["tiny"], vocab_size=BENCH_VOCAB), 8, 64),
    "small": (dict(PRESETS["small"], vocab_size=BENCH_VOCAB), 8, 256),
    # bench_finetune.py's measured model, the `small` preset widened to ~100M parameters
    "100m": (
        dict(
            PRESETS["small"],
            **{k: v for k, v in bench_finetune.FULL["model"].items() if k != "preset"},
            vocab_size=bench_finetune.FULL["vocab_size"],
        ),
        2,
        256,
    ),
}


def measure(size: str, steps: int) -> dict:
    shape, batch, seq_len = SIZES[size]
    args = ModelArgs(**shape)
    sides = {"reference": build(args, seed=0, kernels=KernelChoice.eager()), "optimized": build(args, seed=0)}
    sides["optimized"].load_state_dict(sides["reference"].state_dict())
    optimizers = {name: build_optimizer(model, OptimConfig()) for name, model in sides.items()}
    ids = torch.randint(0, args.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    inputs, labels = ids[:, :-1], ids[:, 1:]
    times = {name: [] for name in sides}
    for step in range(steps + 2):  # the first two steps of each side warm up
        order = ["reference", "optimized"] if step % 2 else ["optimized", "reference"]
        for name in order:
            start = time.perf_counter()
            sides[name](inputs, labels=labels).backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if step >= 2:
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    spread = {name: (max(t) - min(t)) / statistics.median(t) for name, t in times.items()}
    return {
        "size": size,
        "tokens_per_step": batch * seq_len,
        "median_step_s": median,
        "spread": spread,
        "speedup": median["reference"] / median["optimized"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,small,100m")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = []
    for size in args.sizes.split(","):
        r = measure(size, args.steps)
        results.append(r)
        ref, opt = r["median_step_s"]["reference"], r["median_step_s"]["optimized"]
        print(
            f"{size}: reference {ref * 1e3:,.1f} ms, optimized {opt * 1e3:,.1f} ms a step "
            f"(median of {args.steps}, spread {r['spread']['reference']:.0%} / {r['spread']['optimized']:.0%}): "
            f"optimized {r['speedup']:.3f}x"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
