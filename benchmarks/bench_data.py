"""Tokenization throughput and memory: our pipeline at 1 and N workers against datasets.map(num_proc=N).

    python benchmarks/bench_data.py                     # 300 MB corpus, N = the CPUs this process may use
    python benchmarks/bench_data.py --mb 5 --workers 2  # a quick check that everything runs

It writes a corpus of parquet shards (generated text: words of the Python standard library's
sources drawn with Zipf frequencies, documents of FineWeb-like lengths), trains one byte-level BPE
on a sample of it, then tokenizes the whole corpus three or four ways, each in a fresh process:

- ours-1:  prepare_data(num_workers=1): one process, the tokenizer pinned to one thread
- ours-N:  prepare_data(num_workers=N)
- datasets-N: load_dataset("parquet") + Dataset.map(batched=True, num_proc=N) with the same
  tokenizers.Tokenizer (encode_batch, no special tokens), one thread per process
  (TOKENIZERS_PARALLELISM=false, as for ours); its map-only time is reported too

MB/s is the corpus's text (UTF-8 bytes of the documents) over the wall time from start to tokens on
disk (ours includes hashing the files and writing the shards; datasets includes converting the
parquet to its Arrow cache). Memory is sampled every 50 ms over the whole process tree: the peak
of the summed PSS (shared pages split between the processes that share them, so forked workers are
not counted N times) and the peak RSS of the largest single process. The targets: ours-N >= 1.7x
ours-1 on 2 cores, ours-N >= datasets-N, peak memory < 1 GB whatever the corpus size.

The data pipeline is imported without the `trainer` package's __init__ (which imports torch for the
training loop), so the figures are the pipeline's own, not torch's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARD_MB = 32


# ---------------------------------------------------------------------------- corpus and tokenizer


def _vocabulary() -> list[str]:
    """Words and identifiers of the standard library's sources, most frequent first."""
    from collections import Counter

    counts: Counter = Counter()
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py"))[:300]:
        counts.update(re.findall(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+|[^\sA-Za-z0-9_]", path.read_text(errors="replace")))
    return [w for w, _ in counts.most_common(30000)]


def write_corpus(folder: Path, megabytes: float, seed: int = 0) -> int:
    """Parquet shards of generated documents; returns the text bytes. Deterministic, reused if present."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    done = folder / "corpus.json"
    if done.is_file():
        info = json.loads(done.read_text())
        if info["megabytes"] == megabytes and info["seed"] == seed:
            return info["text_bytes"]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    words = np.array(_vocabulary() + ["\n", "\n\n", ". ", ", "], dtype=object)
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, len(words) + 1)
    p = 1.0 / ranks**1.1
    p /= p.sum()
    target, total, shard = int(megabytes * 1e6), 0, 0
    while total < target:
        docs, shard_bytes = [], 0
        while shard_bytes < SHARD_MB * 1e6 and total + shard_bytes < target:
            n_words = int(min(20000, rng.lognormal(6.2, 0.9)))  # median ~500 words, ~3 KB
            text = " ".join(words[rng.choice(len(words), size=n_words, p=p)])
            docs.append(text)
            shard_bytes += len(text.encode())
        pq.write_table(
            pa.table({"text": docs, "id": np.arange(len(docs)) + shard * 10**7}),
            folder / f"shard-{shard:05d}.parquet",
            row_group_size=1000,
        )
        total += shard_bytes
        shard += 1
    done.write_text(json.dumps({"megabytes": megabytes, "seed": seed, "text_bytes": total}))
    return total


def train_tokenizer(corpus: Path, out: Path, vocab_size: int) -> Path:
    """A byte-level BPE trained on the first ~20 MB of the corpus (ours and datasets use the same file)."""
    if (out / "tokenizer.json").is_file():
        return out
    import pyarrow.parquet as pq

    data = _import_data_pipeline()
    sample, size = [], 0
    for path in sorted(corpus.glob("*.parquet")):
        for text in pq.read_table(path, columns=["text"]).column("text").to_pylist():
            sample.append(text)
            size += len(text)
            if size > 20e6:
                break
        if size > 20e6:
            break
    data["train_bpe"](sample, vocab_size).save(str(out))
    return out


# ---------------------------------------------------------------------------- one measured run (child process)


def _import_data_pipeline() -> dict:
    """trainer.data.prepare without trainer/__init__.py and trainer/data/__init__.py, which import torch."""
    import types

    for name, sub in (("trainer", "trainer"), ("trainer.data", "trainer/data")):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [str(REPO / sub)]
            sys.modules[name] = package
    from trainer.data.prepare import prepare_data
    from trainer.data.tokenizer import train_bpe

    return {"prepare_data": prepare_data, "train_bpe": train_bpe}


def run_ours(corpus: str, tokenizer: str, workers: int, cache: str) -> dict:
    data = _import_data_pipeline()
    t0 = time.perf_counter()
    prepared = data["prepare_data"](corpus, tokenizer=tokenizer, val_fraction=0.0, cache_dir=cache, num_workers=workers)
    seconds = time.perf_counter() - t0
    # Tokens without the EOS after each document, to compare with datasets' count.
    return {"seconds": seconds, "tokens": len(prepared.train) - prepared.n_documents, "documents": prepared.n_documents}


def run_datasets(corpus: str, tokenizer: str, workers: int, cache: str) -> dict:
    import pyarrow.compute as pc
    from datasets import disable_progress_bars, load_dataset
    from tokenizers import Tokenizer

    disable_progress_bars()
    tok = Tokenizer.from_file(os.path.join(tokenizer, "tokenizer.json"))

    def encode(batch):
        return {"input_ids": [e.ids for e in tok.encode_batch(batch["text"], add_special_tokens=False)]}

    t0 = time.perf_counter()
    files = sorted(str(p) for p in Path(corpus).glob("*.parquet"))
    ds = load_dataset("parquet", data_files=files, split="train", cache_dir=cache)
    t1 = time.perf_counter()
    out = ds.map(encode, batched=True, num_proc=workers if workers > 1 else None, remove_columns=ds.column_names)
    t2 = time.perf_counter()
    tokens = int(pc.sum(pc.list_value_length(out.data.column("input_ids"))).as_py())
    return {"seconds": t2 - t0, "map_seconds": t2 - t1, "tokens": tokens, "documents": len(out)}


# ---------------------------------------------------------------------------- the parent: run, sample memory, report


def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def _memory(pid: int) -> tuple[int, int]:
    """(summed PSS, largest RSS) in bytes over the process tree under pid (Linux /proc)."""
    pss_sum, rss_max, stack = 0, 0, [pid]
    while stack:
        p = stack.pop()
        stack += _children(p)
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line and not line.startswith(" "))
            pss_sum += int(fields["Pss"].split()[0]) * 1024
            rss_max = max(rss_max, int(fields["Rss"].split()[0]) * 1024)
        except (OSError, KeyError, ValueError):
            continue
    return pss_sum, rss_max


def measure(side: str, workers: int, corpus: Path, tokenizer: Path, work: Path) -> dict:
    cache = work / f"cache-{side}-{workers}"
    shutil.rmtree(cache, ignore_errors=True)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if workers == 1:
        env["RAYON_NUM_THREADS"] = "1"  # the single-core figure: no tokenizer threads either
    cmd = [
        sys.executable,
        __file__,
        "--child",
        side,
        "--workers",
        str(workers),
        "--corpus",
        str(corpus),
        "--tokenizer",
        str(tokenizer),
        "--cache",
        str(cache),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
    peak = [0, 0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            pss, rss = _memory(proc.pid)
            peak[0], peak[1] = max(peak[0], pss), max(peak[1], rss)
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{side} with {workers} worker(s) failed (exit {proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    shutil.rmtree(cache, ignore_errors=True)
    return {"side": side, "workers": workers, **result, "peak_pss_bytes": peak[0], "peak_rss_bytes": peak[1]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=300, help="corpus size in MB of text (default 300)")
    parser.add_argument("--workers", type=int, default=0, help="N (default: the CPUs this process may use)")
    parser.add_argument("--vocab", type=int, default=16384, help="BPE vocabulary size")
    parser.add_argument(
        "--work",
        default="",
        help="folder for the corpus, tokenizer and caches (default: a temp folder, removed after); reused when given",
    )
    parser.add_argument("--json", default="", help="also write the results here")
    parser.add_argument("--skip-datasets", action="store_true", help="only our pipeline")
    parser.add_argument("--child", choices=["ours", "datasets"], help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        run = run_ours if args.child == "ours" else run_datasets
        print(json.dumps(run(args.corpus, args.tokenizer, args.workers, args.cache)))
        return 0

    n = args.workers or len(os.sched_getaffinity(0))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-data-"))
    try:
        t0 = time.perf_counter()
        text_bytes = write_corpus(work / "corpus", args.mb)
        tokenizer = train_tokenizer(work / "corpus", work / f"tokenizer-{args.vocab}", args.vocab)
        print(
            f"corpus: {text_bytes / 1e6:.0f} MB of text in {len(list((work / 'corpus').glob('*.parquet')))} "
            f"parquet shards; BPE vocab {args.vocab}; {n} worker(s); setup {time.perf_counter() - t0:.0f}s",
            flush=True,
        )
        plan = [("ours", 1), ("ours", n)] + ([] if args.skip_datasets else [("datasets", n)])
        results = []
        for side, workers in plan:
            r = measure(side, workers, work / "corpus", tokenizer, work)
            r["mb_per_s"] = text_bytes / 1e6 / r["seconds"]
            results.append(r)
            extra = f", map alone {r['map_seconds']:.1f}s" if "map_seconds" in r else ""
            print(
                f"{side + '-' + str(workers):>12}: {r['seconds']:7.1f}s  {r['mb_per_s']:6.2f} MB/s  peak PSS "
                f"{r['peak_pss_bytes'] / 2**20:6.0f} MiB  largest RSS {r['peak_rss_bytes'] / 2**20:6.0f} MiB  "
                f"{r['tokens']:,} tokens{extra}",
                flush=True,
            )
        ours1, oursn = results[0], results[1]
        checks = {
            f"ours-{n} / ours-1 >= 1.7 (2 cores)": oursn["mb_per_s"] / ours1["mb_per_s"],
            "peak PSS < 1 GB (ours)": max(r["peak_pss_bytes"] for r in results[:2]) / 1e9,
        }
        if not args.skip_datasets:
            peer = results[2]
            checks[f"ours-{n} / datasets-{n} >= 1"] = oursn["mb_per_s"] / peer["mb_per_s"]
            if peer["tokens"] != oursn["tokens"]:
                print(f"warning: token counts differ: ours {oursn['tokens']:,}, datasets {peer['tokens']:,}")
        for name, value in checks.items():
            print(f"{name}: {value:.2f}")
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {
                        "text_bytes": text_bytes,
                        "workers": n,
                        "vocab": args.vocab,
                        "cpu_count": os.cpu_count(),
                        "results": results,
                        "checks": checks,
                    },
                    indent=1,
                )
            )
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
