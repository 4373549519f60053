"""Memory and speed of every optimizer, side by side, on the same model.

    python benchmarks/bench_optim.py                  # measure on this machine (CPU or GPU), then predict 7B
    python benchmarks/bench_optim.py --predict-only   # the Llama-7B-shaped prediction table only

Measured: a ~110M-parameter Llama-shaped model (12 layers, width 768, vocabulary 32000, tied
embeddings) trained for a few steps per optimizer, each in its own process so that the peak
(ru_maxrss on CPU: the whole process, Python and torch included; max_memory_allocated on CUDA) is
that optimizer's alone. Clipping is off for all (layer-wise optimizers cannot clip), so the runs
differ only in the optimizer. Predicted: bytes of weights, gradients and optimizer state of
PRESETS["llama-7b"] in bf16, from the shapes alone (activations excluded), per optimizer.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

MODEL = {
    "model.preset": "small",
    "model.hidden_size": 768,
    "model.intermediate_size": 2048,
    "model.n_layers": 12,
    "model.n_heads": 12,
    "model.n_kv_heads": 12,
    "model.vocab_size": 32000,
    "model.tie_embeddings": True,
}
GALORE_RANK_7B = 1024  # the GaLore paper's rank for its 7B runs
# APOLLO's rank for 7B: 2 x 256 x the longer side of every attention and MLP matrix in bf16 is the 1.6 GB of
# optimizer state the APOLLO paper reports for LLaMA-7B (arXiv:2412.05270).
APOLLO_RANK_7B = 256
MEASURED_RANK = 128
BNB_BLOCK = 256  # bitsandbytes' blockwise 8-bit optimizers keep one fp32 absmax per 256 values
BNB_MIN_8BIT = 4096  # smaller tensors keep 32-bit states


def measure(name: str, steps: int, threads: int, out: Path) -> dict:
    """Trains MODEL for `steps` with optimizer `name` in this process; returns its memory and speed."""
    from trainer import Trainer
    from trainer.config import load_config
    from trainer.metrics import read_metrics

    cfg = load_config(
        None,
        {
            **MODEL,
            "optim.name": name,
            "optim.galore_rank": MEASURED_RANK,
            "optim.apollo_rank": MEASURED_RANK,
            "data.tokenizer": "byte",
            "train.output_dir": str(out),
            "train.max_steps": steps,
            "train.micro_batch_size": 2,
            "train.seq_len": 128,
            "train.dtype": "fp32",
            "train.max_grad_norm": 0,
            "train.eval_batches": 1,
            "train.progress": "none",
            "optim.warmup_steps": 1,
            "train.threads": threads,
        },
    )
    Trainer(cfg).train()
    records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    steady = records[1:] or records  # the first step pays for warm-up
    keys = ("param_bytes", "grad_bytes", "optim_state_bytes")
    return {
        "name": name,
        **{k: records[0][k] for k in keys},
        "peak_mem_bytes": records[-1]["peak_mem_bytes"],
        "tokens_per_s": sum(r["tokens_per_s"] for r in steady) / len(steady),
        "final_loss": records[-1]["loss"],
    }


def predict(name: str, args, rank: int, param_bytes: int) -> dict:
    """Bytes of weights, gradients and optimizer state of a model shaped `args` with optimizer `name`."""
    from trainer.optim import parse_name

    h, inter, layers = args.hidden_size, args.intermediate_size, args.n_layers
    kv = args.n_kv_heads * args.head_dim
    matrices = [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter)] * layers  # attention, MLP
    embeddings = [(args.vocab_size, h)] * (1 if args.tie_embeddings else 2)  # input, and output unless tied
    others = embeddings + [(h,)] * (2 * layers + 1)  # and the norms
    numel = lambda shape: shape[0] * (shape[1] if len(shape) > 1 else 1)  # noqa: E731
    base, galore, layerwise = parse_name(name)

    def full_state(shape) -> int:
        n = numel(shape)
        if base in ("adamw", "apollo_adamw"):
            return 2 * n * param_bytes  # torch keeps AdamW's moments in the weight's dtype
        if base == "adafactor":  # fp32 momentum, factored fp32 second moment
            return 4 * n + (4 * sum(shape) if len(shape) > 1 else 4 * n)
        return 2 * n + 8 * -(-n // BNB_BLOCK) if n >= BNB_MIN_8BIT else 8 * n

    state = sum(full_state(s) for s in others)
    for m, n in matrices:
        k = min(rank, m, n)
        if galore:
            state += k * min(m, n) * param_bytes  # the projector
            state += full_state((k, max(m, n)))  # the inner optimizer on the projected gradient
        elif base == "apollo_adamw":
            state += k * min(m, n) * param_bytes  # the random projection
            state += (2 * k * max(m, n) + 1) * param_bytes  # moments of the projected gradient, the limiter's norm
        else:
            state += full_state((m, n))
    all_shapes = matrices + others
    n_params = sum(numel(s) for s in all_shapes)
    grads = max(numel(s) for s in all_shapes) if layerwise else n_params
    return {"name": name, "params": n_params * param_bytes, "grads": grads * param_bytes, "state": state}


def prediction_table() -> str:
    from trainer.models.config import resolve_args
    from trainer.optim import optimizer_names

    rows = ["| optim.name | weights | gradients | optimizer state | total (no activations) |", "|---|---|---|---|---|"]
    for name in optimizer_names():
        rank = APOLLO_RANK_7B if name.startswith("apollo_") else GALORE_RANK_7B
        p = predict(name, resolve_args("llama-7b"), rank, param_bytes=2)
        total = p["params"] + p["grads"] + p["state"]
        rows.append(f"| `{name}` | {gb(p['params'])} | {gb(p['grads'])} | {gb(p['state'])} | {gb(total)} |")
    return "\n".join(rows)


def measured_table(results: list[dict]) -> str:
    from trainer.models.config import resolve_args

    shape = {k.split(".")[1]: v for k, v in MODEL.items() if k != "model.preset"}
    args = resolve_args(MODEL["model.preset"], 257, **shape)
    rows = [
        "| optim.name | param_bytes | grad_bytes | optim_state_bytes (predicted) | peak | tokens/s | loss after |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        predicted = predict(r["name"], args, MEASURED_RANK, param_bytes=4)["state"]
        rows.append(
            f"| `{r['name']}` | {mb(r['param_bytes'])} | {mb(r['grad_bytes'])} | {mb(r['optim_state_bytes'])} "
            f"({mb(predicted)}) | {mb(r['peak_mem_bytes'])} | {r['tokens_per_s']:.0f} "
            f"| {r['final_loss']:.3f} |"
        )
    return "\n".join(rows)


def gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predict-only", action="store_true")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    parser.add_argument("--names", default="", help="comma-separated optim.name values (default: all)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one optimizer in this process
    parser.add_argument("--json", help="also write the measured results here")
    args = parser.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(measure(args.one, args.steps, args.threads, Path(tmp) / "run")))
        return
    print(
        f"Predicted, Llama-7B shape, bf16 weights, GaLore rank {GALORE_RANK_7B}, APOLLO rank {APOLLO_RANK_7B}:\n"
        + prediction_table()
        + "\n"
    )
    if args.predict_only:
        return
    from trainer.optim import optimizer_names

    results = []
    for name in args.names.split(",") if args.names else optimizer_names():
        proc = subprocess.run(
            [sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--threads", str(args.threads)],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        if proc.returncode != 0:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"measured {name}: {results[-1]}", file=sys.stderr)
    print(f"Measured, ~110M parameters, fp32, batch 2 x 128 tokens, {args.steps} steps:\n" + measured_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
