"""Which fine-tuning option fits a 24 GB card: six options side by side, measured and predicted.

    python benchmarks/bench_finetune.py                      # measure the ~100M model on CPU, predict Llama-3-8B
    python benchmarks/bench_finetune.py --predict-only       # only the Llama-3-8B predictions (seconds)
    python benchmarks/bench_finetune.py --quick              # the tiny model, 3 steps: checks the plumbing

The options: full fine-tuning with AdamW, 8-bit AdamW, 8-bit GaLore stepped layer-wise, APOLLO, and
LoRA and QLoRA of rank 16 on every attention and MLP matrix.

Measured (CPU, fp32): one randomly initialised ~100M-parameter Llama-3-shaped model (preset
`small` with hidden 768, 12 layers, 12 query / 4 key-value heads, MLP 2048, untied embeddings,
vocabulary a 16384-token BPE trained on the corpus) is saved once in bf16 with `save_hf`, its
tokenizer beside it, and every option trains that folder (`model.from_hf`) on the same batches, each in a
process of its own so its peak is its own. Reported: trainable parameters; bytes of all weights
as stored (4-bit ones included), of the trainable weights, of their gradients (layer-wise: the
largest single gradient) and of the optimizer state, from metrics.jsonl; the process's peak
resident memory (ru_maxrss: Python, torch and loading the model included); the peak of live
tensors during the training steps (trainer.plan.measure, a second short run under the allocation
recorder) beside the planner's prediction of it; tokens/s after the first step; the training loss
at step 1 and at the last step. Clipping is off and there is no accumulation for all (the
layer-wise optimizer allows neither), so the runs differ only in the option.

Predicted (Llama-3-8B, 1 x 2048 tokens a step, bf16 compute and weights, full activation
checkpointing, the fused loss, GaLore and APOLLO rank 128): the planner's peak for each option
(trainer.plan.predict_peak, which allocates nothing), its breakdown at the peak, the memory the
card needs (CUDA context and allocator slack added), and whether that fits an RTX 4090 (24 GiB)
and an L4 (22.5 GiB); also what it needs without checkpointing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trainer.bench.machine_load import OTHER_LOAD_LIMIT, OtherLoad  # noqa: E402 (after the path above)

# name -> (label, config overrides). Every option also gets COMMON.
OPTIONS = {
    "adamw": ("full, AdamW", {"optim.name": "adamw"}),
    "adamw8bit": ("full, 8-bit AdamW", {"optim.name": "adamw8bit"}),
    "galore_adamw8bit_layerwise": ("full, 8-bit GaLore, layer-wise", {"optim.name": "galore_adamw8bit_layerwise"}),
    "apollo_adamw": ("full, APOLLO", {"optim.name": "apollo_adamw"}),
    "lora_r16": ("LoRA r16", {"optim.name": "adamw", "lora.rank": 16}),
    "qlora_r16": ("QLoRA r16 (nf4)", {"optim.name": "adamw", "lora.rank": 16, "lora.quantize": "nf4"}),
}
# Layer-wise optimizers refuse clipping and accumulation: none for any option, so only the option differs.
COMMON = {"train.max_grad_norm": 0, "train.grad_accum_steps": 1, "lora.alpha": 16}

# The measured model: the `small` preset widened to ~100M parameters, Llama-3's shape otherwise
# (grouped-query attention with 3 query heads per key-value head, untied embeddings).
FULL = {
    "model": {
        "preset": "small",
        "hidden_size": 768,
        "intermediate_size": 2048,
        "n_layers": 12,
        "n_heads": 12,
        "n_kv_heads": 4,
        "tie_embeddings": False,
    },
    "tokenizer": "bpe",
    "vocab_size": 16384,
    "run": {"train.micro_batch_size": 2, "train.seq_len": 256, "optim.galore_rank": 128, "optim.apollo_rank": 128},
    "steps": 10,
}
QUICK = {
    "model": {"preset": "tiny"},  # hidden 128, 2 layers, vocabulary 320 (the byte tokenizer, padded)
    "tokenizer": "byte",
    "vocab_size": 257,
    "run": {"train.micro_batch_size": 2, "train.seq_len": 32, "optim.galore_rank": 16, "optim.apollo_rank": 16},
    "steps": 3,
}
RUN = {
    "train.device": "cpu",
    "train.dtype": "fp32",
    "train.param_dtype": "fp32",
    "train.log_every": 1,
    "train.progress": "none",
    "train.eval_batches": 1,
    "train.overwrite": True,
    "optim.warmup_steps": 1,
    "lora.save_merged": False,
}
LIVE_STEPS = 2  # steps recorded for the live-tensor peak (the second has every optimizer state from the start)

# Llama-3-8B as one would fine-tune it on one 24 GB card.
LLAMA_8B = {
    "model.preset": "llama-8b",
    "train.seq_len": 2048,
    "train.micro_batch_size": 1,
    "train.dtype": "bf16",
    "train.param_dtype": "bf16",
    "parallel.activation_checkpointing": "full",
    "optim.galore_rank": 128,
    "optim.apollo_rank": 128,
}
CARDS = ("rtx4090-24gb", "l4-24gb")

GIB, MIB = 2**30, 2**20


class UsageError(Exception):
    pass


# ---------------------------------------------------------------- figures of a model


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def stored_weight_bytes(model) -> int:
    """Bytes of every weight as stored: frozen and trainable, a 4-bit weight with its quantization scales."""
    total = 0
    for p in model.parameters():  # a tied embedding and head once
        total += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None:  # bitsandbytes nf4: absmax per block, double-quantized (its own absmax and offset)
            for t in (
                state.absmax,
                getattr(state, "offset", None),
                getattr(getattr(state, "state2", None), "absmax", None),
            ):
                if t is not None:
                    total += t.numel() * t.element_size()
    return total


def trainable_parameters_of_shape(config) -> int:
    """Trainable parameters of `config`'s preset (one with its own vocabulary) and LoRA settings, counted on
    the meta device (no memory)."""
    import torch

    from trainer.lora import apply_lora
    from trainer.models import Transformer
    from trainer.models.config import resolve_args

    with torch.device("meta"):
        model = Transformer(resolve_args(config.model.preset))
    if config.lora.rank > 0:  # quantization changes what the base weighs, not what trains
        apply_lora(model, dataclasses.replace(config.lora, quantize="none"))
    return trainable_parameters(model)


# ---------------------------------------------------------------- configs


def run_config(name: str, settings: dict, base: Path, out: Path, data: dict, steps: int, threads: int):
    from trainer import load_config

    values = {
        **RUN,
        **settings["run"],
        **COMMON,
        **OPTIONS[name][1],
        "model.from_hf": str(base),
        "data.path": data["path"],
        "data.cache_dir": data["cache_dir"],
        "train.output_dir": str(out),
        "train.max_steps": steps,
        "train.threads": threads,
    }
    return load_config(None, values)


def llama_8b_config(name: str, checkpointing: str = "full"):
    from trainer import load_config

    return load_config(
        None, {**LLAMA_8B, **COMMON, **OPTIONS[name][1], "parallel.activation_checkpointing": checkpointing}
    )


# ---------------------------------------------------------------- the base model


def make_base(settings: dict, folder: Path, data: dict, seed: int = 0) -> dict:
    """Saves the randomly initialised model and its tokenizer into `folder`, and tokenizes the corpus
    with that folder's tokenizer as the runs will, so that no run pays for it."""
    import torch

    from trainer.data import prepare_data
    from trainer.models import build, save_hf
    from trainer.models.config import resolve_args

    common = {"val_fraction": 0.01, "cache_dir": data["cache_dir"] or None}
    prepared = prepare_data(data["path"], tokenizer=settings["tokenizer"], vocab_size=settings["vocab_size"], **common)
    shape = {k: v for k, v in settings["model"].items() if k != "preset"}
    args = resolve_args(settings["model"]["preset"], prepared.tokenizer.vocab_size, **shape)
    # Saved in bf16, as released checkpoints are; every run upcasts it to fp32 when loading. (Loaded from an
    # fp32 folder on CPU, the weights would be views of one buffer holding the whole file, which the
    # embeddings a QLoRA run leaves unquantized keep alive: its fp32 base would stay beside the 4-bit one.)
    model = build(args, seed=seed).to(torch.bfloat16)
    save_hf(model, folder)
    prepared.tokenizer.save(str(folder))
    prepare_data(data["path"], tokenizer=str(folder), vocab_size=settings["vocab_size"], **common)
    params = sum(p.numel() for p in model.parameters())
    return {"folder": str(folder), "parameters": params, **args.to_dict()}


# ---------------------------------------------------------------- one option, in its own process


def measure_option(name: str, config) -> dict:
    """Trains `config` in this process (no evaluation, no checkpoints); returns its figures."""
    from trainer import Trainer, build_run
    from trainer.metrics import read_metrics

    parts = build_run(config)
    parts.evaluator = None
    parts.checkpointer = None
    model = parts.model
    figures = {"trainable_params": trainable_parameters(model), "weight_bytes": stored_weight_bytes(model)}
    start = time.perf_counter()
    Trainer(config, parts=parts).train()
    seconds = time.perf_counter() - start
    folder = Path(config.train.output_dir)
    records = [r for r in read_metrics(folder / "metrics.jsonl") if "loss" in r]
    summary = json.loads((folder / "train_results.json").read_text())
    first = records[0]
    return {
        **figures,
        "param_bytes": first["param_bytes"],
        "grad_bytes": first["grad_bytes"],
        "optim_state_bytes": first["optim_state_bytes"],
        "peak_rss_bytes": records[-1]["peak_mem_bytes"],
        "tokens_per_s": summary["tokens_per_s"],
        "first_loss": first["loss"],
        "final_loss": records[-1]["loss"],
        "losses": [r["loss"] for r in records],
        "train_seconds": seconds,
    }


def measure_live_peak(config) -> dict:
    from trainer.plan.measure import measure_training_peak

    m = measure_training_peak(config)
    return {"live_peak_bytes": m.peak_bytes, "live_step_peaks": m.step_peaks}


def child_main(args) -> None:
    spec = json.loads(args.child)
    config = run_config(
        spec["name"],
        spec["settings"],
        Path(spec["base"]),
        Path(spec["out"]),
        spec["data"],
        spec["steps"],
        spec["threads"],
    )
    figures = measure_live_peak(config) if spec["live"] else measure_option(spec["name"], config)
    print("RESULT " + json.dumps(figures))


def run_child(spec: dict) -> tuple[dict, float, float | None]:
    """Runs one option in a fresh process; returns (its figures, wall seconds, the share of the CPUs
    that other processes used meanwhile)."""
    load, t0 = OtherLoad(), time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, cwd=ROOT
    )
    wall = time.perf_counter() - t0
    others = load.share()
    if proc.returncode != 0:
        what = "live-peak run" if spec["live"] else "run"
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{spec['name']}: the {what} failed (exit {proc.returncode}):\n{tail}")
    line = next(x for x in reversed(proc.stdout.splitlines()) if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT ")), wall, others


# ---------------------------------------------------------------- predictions


def predict_cpu(config) -> dict:
    from trainer.plan import predict_peak

    plan = predict_peak(config, device="cpu")
    return {"predicted_peak_bytes": plan.peak_bytes, "predicted_rss_bytes": plan.required_bytes}


def predict_llama_8b(names: list[str]) -> dict:
    from trainer.plan import DEVICES, predict_peak

    rows = []
    for name in names:
        config = llama_8b_config(name)
        plans = {card: predict_peak(config, device=card) for card in CARDS}
        plan = plans[CARDS[0]]
        parts = plan.breakdown
        main = {
            "weights": parts.get("parameters", 0),
            "gradients": parts.get("gradients", 0),
            "optimizer_states": parts.get("optimizer states", 0),
        }
        main["activations_and_temporaries"] = plan.peak_bytes - sum(main.values())
        no_ckpt = predict_peak(llama_8b_config(name, "none"), device=CARDS[0])
        rows.append(
            {
                "name": name,
                "label": OPTIONS[name][0],
                "trainable_params": trainable_parameters_of_shape(config),
                "parameters": plan.parameters,
                "peak_bytes": plan.peak_bytes,
                "peak_phase": plan.phase,
                "peak_at": plan.at,
                "breakdown_at_peak": parts,
                **{f"{k}_bytes": v for k, v in main.items()},
                "overheads": plan.overheads,
                "required_bytes": {card: p.required_bytes for card, p in plans.items()},
                "fits": {card: p.fits(DEVICES[card].memory_bytes) for card, p in plans.items()},
                "required_bytes_without_checkpointing": no_ckpt.required_bytes,
                "fits_without_checkpointing": no_ckpt.fits(DEVICES[CARDS[0]].memory_bytes),
            }
        )
    return {"settings": {**LLAMA_8B, **COMMON}, "cards": {c: DEVICES[c].memory_bytes for c in CARDS}, "results": rows}


# ---------------------------------------------------------------- tables


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def mib(n: float) -> str:
    return f"{n / MIB:,.0f} MiB"


def millions(n: int) -> str:
    return f"{n / 1e6:,.2f} M" if n < 1e9 else f"{n / 1e9:,.2f} B"


def cpu_table(rows: list[dict], steps: int) -> str:
    out = [
        "| option | trainable | weights | trainable weights | gradients | optimizer state | peak RSS (planner) "
        f"| live-tensor peak (planner) | tokens/s | loss step 1 -> {steps} |",
        "|" + "---|" * 10,
    ]
    for r in rows:
        live = (
            f"{mib(r['live_peak_bytes'])} ({mib(r['predicted_peak_bytes'])})"
            if "live_peak_bytes" in r
            else f"- ({mib(r['predicted_peak_bytes'])})"
        )
        out.append(
            f"| {r['label']} | {millions(r['trainable_params'])} | {mib(r['weight_bytes'])} "
            f"| {mib(r['param_bytes'])} | {mib(r['grad_bytes'])} | {mib(r['optim_state_bytes'])} "
            f"| {mib(r['peak_rss_bytes'])} ({mib(r['predicted_rss_bytes'])}) | {live} "
            f"| {r['tokens_per_s']:,.0f} | {r['first_loss']:.3f} -> {r['final_loss']:.3f} |"
        )
    return "\n".join(out)


def fit(row: dict, pred: dict, card: str) -> str:
    need, have = row["required_bytes"][card], pred["cards"][card]
    return f"fits ({gib(have - need)} free)" if row["fits"][card] else f"no ({gib(need - have)} over)"


def llama_table(pred: dict) -> str:
    head = (
        "| option | trainable | weights | gradients | optimizer states | activations + temporaries | peak "
        "| card needs | RTX 4090 (24 GiB) | L4 (22.5 GiB) | needs, no checkpointing |"
    )
    out = [head, "|" + "---|" * 11]
    for r in pred["results"]:
        out.append(
            f"| {r['label']} | {millions(r['trainable_params'])} | {gib(r['weights_bytes'])} "
            f"| {gib(r['gradients_bytes'])} | {gib(r['optimizer_states_bytes'])} "
            f"| {gib(r['activations_and_temporaries_bytes'])} | {gib(r['peak_bytes'])} "
            f"| {gib(r['required_bytes'][CARDS[0]])} | {fit(r, pred, CARDS[0])} | {fit(r, pred, CARDS[1])} "
            f"| {gib(r['required_bytes_without_checkpointing'])} |"
        )
    return "\n".join(out)


# ---------------------------------------------------------------- main


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--options", default=",".join(OPTIONS), help=f"comma-separated, from: {', '.join(OPTIONS)} (default: all)"
    )
    parser.add_argument("--steps", type=int, default=None, help="training steps per option (default 10; --quick 3)")
    parser.add_argument("--quick", action="store_true", help="the tiny model and the byte tokenizer, a few steps")
    parser.add_argument("--predict-only", action="store_true", help="only the Llama-3-8B predictions")
    parser.add_argument(
        "--no-live-peak", action="store_true", help="skip the second, recorded run that measures the live-tensor peak"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads per run (0: torch's default)")
    parser.add_argument("--data", default="builtin:python-stdlib", help="data.path (default: the stdlib corpus)")
    parser.add_argument("--cache-dir", default="", help="data.cache_dir (default: the trainer's cache)")
    parser.add_argument(
        "--workdir",
        default="",
        help="keep the model folder and the runs here (default: a temporary folder, removed at the end)",
    )
    parser.add_argument("--json", help="also write every figure here")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one option in this process
    parser.error = lambda message: (_ for _ in ()).throw(UsageError(message))  # one line, not argparse's usage
    args = parser.parse_args(argv)
    if args.child:
        return args
    names = [n.strip() for n in args.options.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPTIONS]
    if unknown or not names:
        raise UsageError(
            f"--options: unknown option {', '.join(unknown) or '(none given)'}; choose from {', '.join(OPTIONS)}"
        )
    args.names = list(dict.fromkeys(names))
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    if args.threads < 0:
        raise UsageError(f"--threads must be >= 0, got {args.threads}")
    if args.quick and args.predict_only:
        raise UsageError("--quick and --predict-only do not go together: --quick shrinks the measured runs only")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise UsageError(f"--json: the folder of {args.json} does not exist")
    return args


def main(argv=None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.child:
        child_main(args)
        return 0
    from trainer.errors import TrainerError

    try:
        return run(args)
    except TrainerError as e:  # a bad --data, --cache-dir, ...: one line, as the trainer's own commands print
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    import torch

    report = {
        "env": {
            "cpu": cpu_name(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": args.threads or torch.get_num_threads(),
        }
    }
    prediction = predict_llama_8b(args.names)
    report["llama_8b"] = prediction
    print(
        "Predicted, Llama-3-8B, 1 x 2048 tokens a step, bf16 weights and compute, full activation "
        "checkpointing, GaLore/APOLLO rank 128 (the planner; nothing allocated):\n" + llama_table(prediction) + "\n",
        flush=True,
    )

    if not args.predict_only:
        settings = QUICK if args.quick else FULL
        steps = args.steps or settings["steps"]
        data = {"path": args.data, "cache_dir": args.cache_dir}
        with tempfile.TemporaryDirectory(prefix="bench_finetune-") as tmp:
            work = Path(args.workdir or tmp)
            work.mkdir(parents=True, exist_ok=True)
            base = work / "base"
            print(f"saving the base model into {base} ...", file=sys.stderr, flush=True)
            model = make_base(settings, base, data)
            rows = []
            for name in args.names:
                spec = {
                    "name": name,
                    "settings": settings,
                    "base": str(base),
                    "data": data,
                    "steps": steps,
                    "threads": args.threads,
                    "live": False,
                    "out": str(work / "runs" / name),
                }
                config = run_config(name, settings, base, Path(spec["out"]), data, steps, args.threads)
                row = {"name": name, "label": OPTIONS[name][0], **predict_cpu(config)}
                try:
                    figures, wall, others = run_child(spec)
                    row.update(figures, wall_seconds=wall, other_cpu_share=others)
                    if not args.no_live_peak:
                        live = {**spec, "live": True, "steps": min(steps, LIVE_STEPS), "out": str(work / "live" / name)}
                        figures, live_wall, _ = run_child(live)
                        row.update(figures, live_wall_seconds=live_wall)
                except RuntimeError as e:
                    print(f"error: {e}", file=sys.stderr)
                    return 1
                rows.append(row)
                busy = f"; other processes used {others:.0%} of the CPUs meanwhile" if others is not None else ""
                print(f"{name}: {steps} steps in {wall:.0f} s{busy}", file=sys.stderr, flush=True)
                if others is not None and others > OTHER_LOAD_LIMIT:
                    print(f"warning: {name}'s tokens/s is not a quiet machine's figure", file=sys.stderr)
            keys = (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "n_layers",
                "n_heads",
                "n_kv_heads",
                "tie_embeddings",
            )
            shape = {k: model[k] for k in keys}
            report["cpu"] = {
                "model": {**shape, "parameters": model["parameters"]},
                "steps": steps,
                "settings": {**RUN, **settings["run"], **COMMON, "data.path": args.data},
                "results": rows,
            }
        tokens = settings["run"]["train.micro_batch_size"] * settings["run"]["train.seq_len"]
        described = (
            f"hidden {shape['hidden_size']}, {shape['n_layers']} layers, {shape['n_heads']}/"
            f"{shape['n_kv_heads']} heads, MLP {shape['intermediate_size']}, vocabulary {shape['vocab_size']}"
            f"{', tied' if shape['tie_embeddings'] else ''}"
        )
        print(
            f"Measured on {report['env']['cpu']} ({report['env']['threads']} threads): "
            f"{model['parameters'] / 1e6:.1f}M parameters ({described}), fp32, {tokens} tokens a step, "
            f"{steps} steps:\n" + cpu_table(rows, steps)
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
