"""Per-rank memory while a run starts from a Hugging Face checkpoint: FSDP2 (built on the meta
device, each rank reading its slices) against DDP (every rank loads the whole model, as FSDP2 did
before the meta-device build); with `-qlora` after a strategy, QLoRA's start (lora.rank=16,
lora.quantize=nf4: under FSDP2 each rank quantizes one whole tensor at a time and keeps its rows).

    python benchmarks/bench_sharded_load.py --make 1e9 --folder /tmp/ckpt     # a ~1 GB fp32 Llama
    python benchmarks/bench_sharded_load.py --folder /tmp/ckpt --ranks 2       # FSDP and DDP, 2 ranks each
    python benchmarks/bench_sharded_load.py --folder /tmp/ckpt --strategies fsdp-qlora,ddp-qlora

Each rank builds the run (trainer.build.build_run: data, model, sharding, optimizer) and reports
the growth of its peak RSS (VmHWM, reset just before) over its RSS then: the weights it holds, the
checkpoint pages resident while it reads, the data and the process group. Printed as a fraction of
the checkpoint's bytes; the larger rank's figure. (Not the CPU allocator's recorder: it counts
safetensors' mapping of each file whole, although only the pages read become resident.)
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_checkpoint(folder: Path, target_bytes: float) -> None:
    import torch
    import transformers

    hidden, layers = 1024, 1
    per_layer = 12 * hidden * hidden * 4  # attention 4 h^2 + MLP 3 x 2.75 h^2, fp32
    while layers * per_layer < target_bytes:
        layers += 1
    config = transformers.LlamaConfig(
        vocab_size=320,
        hidden_size=hidden,
        intermediate_size=2816,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)


def _status_bytes(key: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def rank_main(args) -> None:
    """One rank: build the run, write its peak RSS growth."""
    import torch

    from tests.helpers import write_corpus
    from trainer.build import build_run
    from trainer.config import load_config

    work = Path(args.work)
    if not (work / "corpus").exists() and os.environ.get("RANK", "0") == "0":
        write_corpus(work / "corpus")
    overrides = {
        "model.from_hf": args.folder,
        "model.allow_new_tokenizer": "true",
        "data.path": str(work / "corpus"),
        "data.tokenizer": "byte",
        "data.cache_dir": str(work / "cache"),
        "train.output_dir": str(work / f"run-{args.strategy}"),
        "train.overwrite": "true",
        "train.seq_len": "32",
        "train.device": "cpu",
        "train.progress": "none",
        "parallel.strategy": args.strategy.removesuffix("-qlora"),
    }
    if args.strategy.endswith("-qlora"):
        overrides.update({"lora.rank": "16", "lora.quantize": "nf4"})
    config = load_config(None, [f"--{k}={v}" for k, v in overrides.items()])
    # Imports are not what is measured: their code pages are the same whatever the checkpoint's size.
    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    import torch.distributed.tensor  # noqa: F401

    import trainer.data  # noqa: F401

    modules = ["triton"] if importlib.util.find_spec("triton") else []  # the model's first build imports it
    if args.strategy.endswith("-qlora"):  # the 4-bit library each path uses
        modules.append("torchao.quantization" if args.strategy.startswith("fsdp") else "bitsandbytes")
    for module in modules:
        importlib.import_module(module)

    Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM) to the current RSS
    before = _status_bytes("VmRSS")
    build_run(config)
    figure = _status_bytes("VmHWM") - before
    rank = int(os.environ.get("RANK", "0"))
    (work / f"{args.strategy}-rank{rank}.json").write_text(json.dumps({"rss_growth_bytes": figure}))
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", required=True)
    parser.add_argument("--make", type=float, default=0, help="first write a Llama checkpoint of about this many bytes")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--strategies", default="fsdp,ddp")
    parser.add_argument("--json", default=None)
    parser.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="fsdp", help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_main:
        rank_main(args)
        return
    folder = Path(args.folder)
    if args.make:
        make_checkpoint(folder, args.make)
    checkpoint = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    results = {"checkpoint_bytes": checkpoint, "ranks": args.ranks}
    with tempfile.TemporaryDirectory() as work:
        for strategy in args.strategies.split(","):
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            command += ["--nproc_per_node", str(args.ranks), __file__, "--rank-main", f"--folder={folder}"]
            command += [f"--strategy={strategy}", f"--work={work}"]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(done.stdout[-2000:] + done.stderr[-3000:])
            files = [Path(work) / f"{strategy}-rank{r}.json" for r in range(args.ranks)]
            rss = max(json.loads(f.read_text())["rss_growth_bytes"] for f in files)
            results[strategy] = {"rss_growth_bytes": rss}
            print(
                f"{strategy}: per rank, peak RSS growth while building the run {rss / 2**20:,.0f} MiB "
                f"({rss / checkpoint:.2f}x the checkpoint)"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
