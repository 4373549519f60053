"""torch.compile and activation checkpointing side by side: tokens/s and memory per setting.

    python benchmarks/bench_parallel.py [--preset small] [--seq-len 256] [--batch 8] [--steps 5]
                                        [--device auto] [--json results.json]

Each setting (compile off/on x checkpointing none/full/selective) trains in a fresh process, so
compile caches and memory high-water marks do not leak from one into the next. The loop is the
trainer's own (`Trainer.train_step`, fp32 on CPU, the default dtype on a GPU).

Memory: on CUDA, the peak allocated during a training step. On CPU there is no allocator
counter, so large allocations are made to map and unmap their own pages (MALLOC_MMAP_THRESHOLD_)
and the figure is the growth of the resident set over one forward pass: the activations autograd
keeps for backward, which is what checkpointing trades against recompute.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = [(compile_, checkpointing) for compile_ in (False, True) for checkpointing in ("none", "full", "selective")]


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(args) -> dict:
    """Runs in the child process: one setting, warm-up steps, timed steps, one measured forward."""
    import torch

    sys.path.insert(0, str(REPO))
    from tests.helpers import write_corpus
    from trainer import Trainer, build_run
    from trainer.config import load_config
    from trainer.prefetch import make_step_batch
    from trainer.runtime import autocast

    work = Path(args.workdir)
    corpus = work / "corpus"
    if not corpus.exists():
        write_corpus(corpus, n_docs=64, words_per_doc=2000)
    cfg = load_config(
        None,
        {
            "model.preset": args.preset,
            "data.path": str(corpus),
            "data.tokenizer": "byte",
            "data.cache_dir": str(work / "cache"),
            "data.val_fraction": 0.0,
            "train.output_dir": str(work / f"run-{args.compile}-{args.checkpointing}"),
            "train.overwrite": True,
            "train.seq_len": args.seq_len,
            "train.micro_batch_size": args.batch,
            "train.device": args.device,
            "train.max_steps": args.warmup + args.steps,
            "train.progress": "none",
            "parallel.compile": args.compile,
            "parallel.activation_checkpointing": args.checkpointing,
        },
    )
    parts = build_run(cfg)
    trainer = Trainer(cfg, parts=parts)
    cuda = parts.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def next_batch():
        return make_step_batch(parts.loader.next_step(), loader_state={}, pin=cuda)

    for _ in range(args.warmup):  # compiles, when compile is on
        trainer.train_step(next_batch())
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step(next_batch())
    sync()
    tokens_per_s = args.steps * args.batch * args.seq_len / (time.perf_counter() - start)

    batch = next_batch()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        trainer.train_step(batch)
        memory = torch.cuda.max_memory_allocated()
    else:
        micro_batch = batch.to(parts.device)[0]
        before = resident_bytes()
        with autocast(parts.device, parts.compute_dtype):
            loss = parts.train_model(micro_batch["input_ids"], labels=micro_batch["labels"])
        memory = resident_bytes() - before
        loss.backward()
    return {
        "compile": args.compile,
        "activation_checkpointing": args.checkpointing,
        "tokens_per_s": tokens_per_s,
        "memory_bytes": memory,
        "memory_kind": "peak allocated" if cuda else "activations (RSS growth)",
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "preset": args.preset,
        "seq_len": args.seq_len,
        "micro_batch_size": args.batch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compile", type=lambda v: v == "True", default=False, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return

    results = []
    with tempfile.TemporaryDirectory() as workdir:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        for compile_, checkpointing in SETTINGS:
            command = [
                sys.executable,
                __file__,
                "--child",
                f"--compile={compile_}",
                f"--checkpointing={checkpointing}",
                f"--workdir={workdir}",
                f"--preset={args.preset}",
                f"--seq-len={args.seq_len}",
                f"--batch={args.batch}",
                f"--steps={args.steps}",
                f"--warmup={args.warmup}",
                f"--device={args.device}",
            ]
            done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"setting compile={compile_} checkpointing={checkpointing} failed:\n{done.stderr[-3000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(
                f"compile={str(compile_):5} checkpointing={checkpointing:9} {r['tokens_per_s']:10,.0f} tokens/s  "
                f"{r['memory_bytes'] / 2**20:8.1f} MiB {r['memory_kind']}",
                flush=True,
            )
    print(f"device: {results[0]['device']}; model {args.preset}, seq_len {args.seq_len}, micro-batch {args.batch}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
