"""The memory planner's prediction beside the measured peak, case by case (the table in docs/memory.md).

    python benchmarks/bench_plan.py                # every case on CPU, tiny and small presets and a ~110M model
    python benchmarks/bench_plan.py --quick        # the tiny and small presets only
    python benchmarks/bench_plan.py --device cuda  # llama-1b in bf16 on this GPU vs torch.cuda.max_memory_allocated

CPU: each case trains two steps in its own process with the CPU allocator's events recorded
(trainer/plan/measure.py); "measured" is the most tensor bytes alive at once during those steps.
GPU: two steps of llama-1b (bf16 weights and compute, micro-batch 1 x 2048 tokens, fused AdamW)
for each checkpointing mode; "measured" is torch.cuda.max_memory_allocated over the steps, and
max_memory_reserved is recorded beside it (to size the allocator-slack margin of
trainer/plan/devices.py). GaLore and APOLLO refresh their projections every step here, so the
measured steps include the SVD / projection draw a long run makes every update_proj_gap steps.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_optim  # noqa: E402  (after the repository is on the path)

TWO_STEPS = {
    "train.max_steps": 2,
    "train.eval_every": 0,
    "train.eval_batches": 1,
    "train.threads": 1,
    "train.dtype": "fp32",
    "train.device": "cpu",
    "train.progress": "none",
    "data.tokenizer": "byte",
    "data.val_fraction": 0.1,
    "optim.warmup_steps": 1,
}
PROJECTIONS = {"optim.galore_update_proj_gap": 1, "optim.apollo_update_proj_gap": 1, "train.max_grad_norm": 0}
TINY = {"model.preset": "tiny", "train.micro_batch_size": 4, "train.seq_len": 128}
SMALL = {"model.preset": "small", "train.micro_batch_size": 4, "train.seq_len": 256}
# ~110M parameters: 12 layers, width 768, vocabulary 32000 (tied): bench_optim's model.
M110 = {**bench_optim.MODEL, "model.max_seq_len": 1024, "train.micro_batch_size": 2, "train.seq_len": 256}


def cases(quick: bool) -> list[tuple[str, dict]]:
    from trainer.optim import optimizer_names

    out = []
    # the ~110M model at 8 x 256 tokens, so that activations, not weights and states, set its peak
    models = [("tiny", TINY), ("small", SMALL)]
    if not quick:
        models.append(("110M, 8 x 256", {**M110, "train.micro_batch_size": 8}))
    for label, model in models:
        for mode in ("none", "full", "selective"):
            out.append((f"{label}, adamw, checkpointing {mode}", {**model, "parallel.activation_checkpointing": mode}))
    optim_model = (
        "tiny",
        {**TINY, "train.micro_batch_size": 2, "train.seq_len": 32, "optim.galore_rank": 32, "optim.apollo_rank": 16},
    )
    big = optim_model if quick else ("110M, 2 x 256", {**M110, "optim.galore_rank": 128, "optim.apollo_rank": 128})
    for label, model in (optim_model, big) if not quick else (optim_model,):
        for name in optimizer_names():
            if name == "adamw":  # the default, in every other case
                continue
            out.append((f"{label}, {name}", {**model, **PROJECTIONS, "optim.name": name}))
    lora = {**SMALL, "model.from_hf": "<small-hf>", "data.tokenizer": "<small-hf>", "lora.rank": 16}
    out.append(("small, LoRA rank 16", lora))
    out.append(("small, LoRA rank 16, dropout 0.1", {**lora, "lora.dropout": 0.1}))
    out.append(("small, LoRA rank 16, selective", {**lora, "parallel.activation_checkpointing": "selective"}))
    out.append(("small, adamw, bf16 autocast", {**SMALL, "train.dtype": "bf16"}))
    out.append(("small, adamw, 2 accumulation steps", {**SMALL, "train.grad_accum_steps": 2}))
    return out


def one_case(overrides: dict, folder: Path) -> dict:
    """Measures and predicts one case in this process."""
    from tests.helpers import write_corpus
    from trainer.config import load_config
    from trainer.plan import predict_peak
    from trainer.plan.measure import measure_training_peak

    corpus = write_corpus(folder / "corpus")
    config = load_config(
        None,
        {
            **TWO_STEPS,
            "data.path": str(corpus),
            "data.cache_dir": str(folder / "cache"),
            "train.output_dir": str(folder / "run"),
            **overrides,
        },
    )
    plan = predict_peak(config, device="cpu")
    measured = measure_training_peak(config)
    return {
        "predicted": plan.peak_bytes,
        "measured": measured.peak_bytes,
        "phase": plan.phase,
        "parameters": plan.parameters,
    }


def small_hf_folder(folder: Path) -> Path:
    from trainer.data.tokenizer import ByteTokenizer
    from trainer.models import build, save_hf

    save_hf(build("small", vocab_size=257, seed=0), folder)
    ByteTokenizer().save(str(folder))
    return folder


def measure_cuda(config) -> int:
    """torch.cuda.max_memory_allocated over the training steps of `config` (train.device=cuda)."""
    import torch

    from trainer import Trainer
    from trainer.callbacks import TrainerCallback

    class Peak(TrainerCallback):
        def __init__(self):
            self.peak, self.reserved = 0, 0

        def on_step_begin(self, config, state, control, **kwargs):
            if state.step == 0:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, config, state, control, **kwargs):
            torch.cuda.synchronize()
            self.peak = max(self.peak, torch.cuda.max_memory_allocated())
            self.reserved = max(self.reserved, torch.cuda.max_memory_reserved())

    peak = Peak()
    Trainer(config, callbacks=[peak]).train()
    measure_cuda.reserved = peak.reserved
    return peak.peak


def cuda_table() -> str:
    from tests.helpers import write_corpus
    from trainer.config import load_config
    from trainer.plan import predict_peak

    rows = [
        "| case | predicted | measured (max_memory_allocated) | predicted / measured | max_memory_reserved |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode in ("none", "selective", "full"):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            config = load_config(
                None,
                {
                    **TWO_STEPS,
                    "train.device": "cuda",
                    "train.dtype": "bf16",
                    "train.param_dtype": "bf16",
                    "model.preset": "llama-1b",
                    "train.seq_len": 2048,
                    "train.micro_batch_size": 1,
                    "parallel.activation_checkpointing": mode,
                    "plan.device": "auto",
                    "data.path": str(write_corpus(tmp / "corpus", n_docs=200, words_per_doc=2000)),
                    "data.cache_dir": str(tmp / "cache"),
                    "train.output_dir": str(tmp / "run"),
                },
            )
            predicted = predict_peak(config).peak_bytes
            measured = measure_cuda(config)
            rows.append(
                f"| llama-1b bf16, 1 x 2048, checkpointing {mode} | {mib(predicted)} | {mib(measured)} | "
                f"{predicted / measured:.3f} | {mib(measure_cuda.reserved)} |"
            )
            print(rows[-1], file=sys.stderr, flush=True)
    return "\n".join(rows)


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny and small presets only")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one case's overrides, as JSON
    args = parser.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(one_case(json.loads(args.one), Path(tmp))))
        return
    if args.device == "cuda":
        print(cuda_table())
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        hf = None
        for label, overrides in cases(args.quick):
            if "<small-hf>" in overrides.values():
                hf = hf or small_hf_folder(Path(tmp) / "small-hf")
                overrides = {k: str(hf) if v == "<small-hf>" else v for k, v in overrides.items()}
            proc = subprocess.run(
                [sys.executable, __file__, "--one", json.dumps(overrides)], capture_output=True, text=True, cwd=ROOT
            )
            if proc.returncode != 0:
                sys.exit(f"{label} failed:\n{proc.stderr[-3000:]}")
            result = {"case": label, **json.loads(proc.stdout.strip().splitlines()[-1])}
            results.append(result)
            print(
                f"{label}: predicted {result['predicted']:,} measured {result['measured']:,} "
                f"({result['predicted'] / result['measured']:.4f})",
                file=sys.stderr,
                flush=True,
            )
    rows = [
        "| case | parameters | predicted | measured | predicted / measured | peak in |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        rows.append(
            f"| {r['case']} | {r['parameters'] / 1e6:.2f} M | {mib(r['predicted'])} | {mib(r['measured'])} | "
            f"{r['predicted'] / r['measured']:.3f} | {r['phase']} |"
        )
    print("\n".join(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
