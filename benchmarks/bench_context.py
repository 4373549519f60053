"""The single-GPU context table: the longest train.seq_len the planner predicts to fit, per card and rung.

    python benchmarks/bench_context.py [--json context.json] [--models llama-8b,qwen3-8b] [--cards 24,48,80]

For Llama 3 8B (the llama-8b preset, with Llama 3.1's 131,072-token max_seq_len so that the model's
limit does not cap the table at Llama 3's 8,192) and Qwen3-8B (its published config.json, written
to a temporary folder; model.from_hf reads only config.json to plan), LoRA rank 16 and QLoRA
(lora.quantize=nf4), bf16 weights and compute, micro-batch 1, each rung added to the one before:
no checkpointing, selective, full, + activation offloading, + tiled MLP (16 tiles). Cards: 24 GB
(rtx4090-24gb), 48 GB (the device table has no 48 GB card: plan.budget=48e9 bytes with the
h100-80gb's kernels and workspaces), 80 GB (h100-80gb).

Where the model's limit binds, the cell also gives what memory alone would allow: the same search
with max_seq_len raised to 1,048,576 (beyond what the model was trained for; Qwen3 documents YaRN
for 131,072). Every figure is `plan --plan.solve=seq_len`'s answer (trainer.plan.choose.longest_seq_len, multiples
of 128 tokens): a prediction, not a measurement, until benchmarks/gpu_suite.py trains at it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Qwen3-8B's config.json as published (Qwen/Qwen3-8B on the Hugging Face hub): only what planning reads.
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "tie_word_embeddings": False,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "attention_bias": False,
    "use_sliding_window": False,
    "sliding_window": None,
    "max_window_layers": 36,
}

CARDS = {
    "24": ("24 GB (rtx4090-24gb)", ["--plan.device=rtx4090-24gb"]),
    "48": ("48 GB (plan.budget=48e9, h100 kernels)", ["--plan.device=h100-80gb", "--plan.budget=48000000000"]),
    "80": ("80 GB (h100-80gb)", ["--plan.device=h100-80gb"]),
}
METHODS = {
    "lora": ("LoRA r16", ["--lora.rank=16"]),
    "qlora": ("QLoRA r16 (nf4)", ["--lora.rank=16", "--lora.quantize=nf4"]),
}
TILES = 16
RUNGS = [
    ("none", []),
    ("selective checkpointing", ["--parallel.activation_checkpointing=selective"]),
    ("full checkpointing", ["--parallel.activation_checkpointing=full"]),
    ("full + offloading", ["--parallel.activation_checkpointing=full", "--parallel.activation_offloading=true"]),
    (
        f"full + offloading + tiled MLP ({TILES})",
        [
            "--parallel.activation_checkpointing=full",
            "--parallel.activation_offloading=true",
            f"--parallel.tiled_mlp={TILES}",
        ],
    ),
]
COMMON = ["--train.micro_batch_size=1", "--train.dtype=bf16", "--train.param_dtype=bf16", "--data.tokenizer=byte"]


UNCAPPED = 1_048_576  # max_seq_len for "what memory alone allows"


def model_flags(name: str, folder: Path, max_seq_len: int | None = None) -> list[str]:
    if name == "llama-8b":
        return ["--model.preset=llama-8b", f"--model.max_seq_len={max_seq_len or 131072}"]
    if name == "qwen3-8b":
        folder.mkdir(parents=True, exist_ok=True)
        config = {**QWEN3_8B, **({"max_position_embeddings": max_seq_len} if max_seq_len else {})}
        (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")
        return [f"--model.from_hf={folder}"]
    raise SystemExit(f"unknown model {name!r}: llama-8b or qwen3-8b")


def solve(argv: list[str]) -> dict:
    from trainer.config import load_config
    from trainer.plan.choose import longest_seq_len
    from trainer.plan.devices import budget_bytes, resolve_device

    config = load_config(None, [*argv, f"--train.seq_len={128 * TILES}"])
    budget = budget_bytes(config, resolve_device(config))
    answer = longest_seq_len(config, budget)
    return {
        "seq_len": answer.seq_len,
        "limit": answer.limit,
        "required_bytes": answer.plan.required_bytes,
        "budget_bytes": budget,
        "host_bytes": answer.plan.host_bytes,
        "next_required_bytes": answer.above.required_bytes if answer.above else None,
    }


def cell(result: dict) -> str:
    if not result["seq_len"]:
        return "does not fit"
    if result["limit"] != "model":
        return f"{result['seq_len']:,}"
    memory = result["memory_allows"]
    allows = f"{memory['seq_len']:,}" + ("+" if memory["limit"] == "model" else "")
    return f"{result['seq_len']:,} (model limit; memory: {allows})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write every answer here")
    parser.add_argument("--models", default="llama-8b,qwen3-8b")
    parser.add_argument("--cards", default="24,48,80")
    parser.add_argument("--methods", default="lora,qlora")
    args = parser.parse_args()
    cards = args.cards.split(",")
    rows, records = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            flags = model_flags(model, Path(tmp) / model)
            uncapped = model_flags(model, Path(tmp) / f"{model}-uncapped", UNCAPPED)
            for method in args.methods.split(","):
                label, method_flags = METHODS[method]
                for rung, rung_flags in RUNGS:
                    results = {}
                    for card in cards:
                        start = time.perf_counter()
                        settings = [*COMMON, *method_flags, *rung_flags, *CARDS[card][1]]
                        results[card] = solve([*flags, *settings])
                        if results[card]["limit"] == "model":
                            results[card]["memory_allows"] = solve([*uncapped, *settings])
                        records.append(
                            {
                                "model": model,
                                "method": method,
                                "rung": rung,
                                "card": CARDS[card][0],
                                **results[card],
                                "seconds": round(time.perf_counter() - start, 1),
                            }
                        )
                    rows.append([model, label, rung, *(cell(results[c]) for c in cards)])
                    print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    header = ["model", "method", "rung (cumulative)", *(f"{CARDS[c][0]}, tokens" for c in cards)]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] * 3 + ["---:"] * len(cards)) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
