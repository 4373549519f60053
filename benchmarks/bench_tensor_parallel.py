"""The loss under tensor parallelism: vocabulary-parallel against the head gathered, on 2 CPU ranks.

Each rank holds half of the output projection's rows and every token's hidden states (what
trainer/parallel/tensor_parallel.py hands the loss). Two ways to get the loss and its gradients:

- vocab-parallel (what the trainer does): trainer.ops.vocab_parallel_cross_entropy; each rank
  computes its rows' logits for every token, one all-gather of two numbers per token;
- gathered head: the head's rows all-gathered into the whole (vocab x hidden) weight on every rank,
  each rank runs the fused loss (trainer.ops.linear_cross_entropy) on its half of the tokens, and
  the weight's gradient is reduce-scattered back to the rows each rank owns.

Each side runs in fresh processes (torchrun, gloo, one thread per rank); forward + backward timed
after one warm-up, and the growth of each rank's peak resident memory over the inputs.

    python benchmarks/bench_tensor_parallel.py [--tokens 8192 --hidden 256 --vocab 32768]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("vocab-parallel", "gathered-head")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(side: str, tokens: int, hidden: int, vocab: int, repeats: int, out: Path) -> None:
    import torch
    import torch.distributed as dist

    from trainer.ops import linear_cross_entropy
    from trainer.ops.vocab_parallel_cross_entropy import vocab_parallel_cross_entropy

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(0)
    hidden_states = torch.randn(tokens, hidden, generator=gen)
    rows = vocab // world
    weight = (torch.randn(vocab, hidden, generator=gen) * 0.02)[rank * rows : (rank + 1) * rows].clone()
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    mine = slice(rank * tokens // world, (rank + 1) * tokens // world)  # the gathered head's tokens
    base = _maxrss_bytes()

    def step() -> float:
        h = hidden_states.detach().requires_grad_()
        w = weight.detach().requires_grad_()
        if side == "vocab-parallel":
            loss = vocab_parallel_cross_entropy(h, w, labels, vocab_start=rank * rows, group=dist.group.WORLD).sum()
            loss.backward()
            dist.all_reduce(h.grad)  # each rank's part of the hidden states' gradient
        else:
            whole = torch.empty(vocab, hidden)
            dist.all_gather_into_tensor(whole, w.detach())
            whole.requires_grad_()
            loss = linear_cross_entropy(h[mine], whole, labels[mine], reduction="sum")
            loss.backward()
            grad_rows = torch.empty_like(w)
            dist.reduce_scatter_tensor(grad_rows, whole.grad)
            dist.all_reduce(loss.detach())
        return float(loss)

    step()  # warm-up
    seconds = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    result = {"rank": rank, "seconds": statistics.median(seconds), "extra_peak_bytes": _maxrss_bytes() - base}
    (out / f"{side}-{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def run_side(side: str, args, out: Path) -> list[dict]:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        __file__,
        "--worker",
        side,
        f"--tokens={args.tokens}",
        f"--hidden={args.hidden}",
        f"--vocab={args.vocab}",
        f"--repeats={args.repeats}",
        f"--out={out}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return [json.loads((out / f"{side}-{rank}.json").read_text()) for rank in range(2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.tokens, args.hidden, args.vocab, args.repeats, args.out)
        return
    print(f"{args.tokens} tokens x hidden {args.hidden} x vocabulary {args.vocab}, fp32, 2 ranks (gloo, 1 thread each)")
    out = Path(tempfile.mkdtemp(prefix="bench_tensor_parallel-"))
    for side in SIDES:
        ranks = run_side(side, args, out)
        slowest = max(r["seconds"] for r in ranks)
        most = max(r["extra_peak_bytes"] for r in ranks)
        print(
            f"{side:>15}: {slowest * 1e3:8.1f} ms forward + backward, peak RSS growth {most / 2**20:7.1f} MiB per rank"
        )


if __name__ == "__main__":
    main()
