"""What a checkpoint costs the training step, with and without checkpoint.async_save, side by side.

A run of the configured preset is built (trainer.build.build_run) and takes one training step, so
the optimizer has its states; then checkpoints are saved alternately in the two modes. For each:
the time save() blocks the step, and (async) the time its thread takes to finish the files.

    python benchmarks/bench_async_save.py                      # small preset, 5 saves each
    python benchmarks/bench_async_save.py --repeats 3 -- --model.hidden_size=1024 --model.n_layers=8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests.helpers writes the corpus
    sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("overrides", nargs="*", help="more settings, e.g. --model.hidden_size=1024 after --")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import torch

    from tests.helpers import write_corpus
    from trainer.build import build_run
    from trainer.config import load_config

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        write_corpus(work / "corpus")
        values = {
            "model.preset": args.preset,
            "data.path": str(work / "corpus"),
            "data.tokenizer": "byte",
            "data.cache_dir": str(work / "cache"),
            "train.output_dir": str(work / "run"),
            "train.seq_len": "64",
            "train.device": "cpu",
            "train.progress": "none",
            "checkpoint.keep_last": "0",
        }
        parts = build_run(load_config(None, [f"--{k}={v}" for k, v in values.items()] + args.overrides))
        ids = torch.randint(0, 256, (2, 64))
        parts.model(ids, labels=ids).backward()
        parts.optimizer.step()
        checkpointer = parts.checkpointer
        n_params = sum(p.numel() for p in parts.model.parameters())
        results = {"preset": args.preset, "parameters": n_params, "sync": [], "async": [], "async_write": []}
        step = 0
        for _ in range(args.repeats):
            for mode in ("sync", "async"):
                step += 1
                checkpointer.async_save = mode == "async"
                start = time.perf_counter()
                checkpointer.save(
                    step,
                    model=parts.model,
                    optimizer=parts.optimizer,
                    scheduler=parts.scheduler,
                    scaler=None,
                    trainer_state={"step": step},
                    sampler_state={},
                )
                results[mode].append(time.perf_counter() - start)
                if mode == "async":
                    checkpointer.wait()
                    results["async_write"].append(time.perf_counter() - start)
    sync, blocked, written = (statistics.median(results[k]) for k in ("sync", "async", "async_write"))
    print(
        f"{args.preset} ({n_params / 1e6:.1f}M parameters, fp32, AdamW): a save blocks the step "
        f"{sync * 1e3:.0f} ms synchronous, {blocked * 1e3:.0f} ms with async_save "
        f"({blocked / sync:.2f}x; its thread finished the files {written * 1e3:.0f} ms after the save began)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
