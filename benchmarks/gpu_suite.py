"""The GPU suite: the benchmarks in benchmarks/ within one 10-minute call, into one results file.

    python3 benchmarks/gpu_suite.py [--budget 540]

1. Installs the wheels carried in .whl/ (benchmarks/README.md: liger-kernel, bitsandbytes,
   galore-torch; the GPU image has torch and triton) into /tmp/site, put on PYTHONPATH with the
   repository for every part.
2. Runs, each in its own process group under a time limit:
   - kernels: pytest benchmarks/bench_kernels.py (pytest-benchmark);
   - bench-llama-1b: `python -m trainer bench` on the Llama-3.2-1B-shaped preset in bf16 against the
     eager fp32 reference and the Hugging Face peer (with Liger-Kernel when it is installed);
   - e2e: benchmarks/bench_e2e.py on the small preset (each setting against the eager reference),
     peers left out (the Llama run has them);
   - parallel: benchmarks/bench_parallel.py (torch.compile x activation checkpointing);
   - optim: benchmarks/bench_optim.py (memory and speed of every optimizer).
   A part's limit is what is left of the budget minus the shares of the parts after it, so time a
   part does not use goes to the next. A part that fails or runs out of time is recorded as such and
   the others still run.
3. Writes benchmarks/results/<device>-<date>.json (device name, date, torch, triton and the other
   packages' versions, each part's command, status, seconds and figures) after every part, so a call
   cut short keeps what finished; when $OUT is set (the lent GPU machine's return folder) a copy goes
   there too.
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITE = Path("/tmp/site")
PACKAGES = ("torch", "triton", "transformers", "liger-kernel", "bitsandbytes", "galore-torch", "safetensors",
            "tokenizers", "numpy", "matplotlib", "pytest", "pytest-benchmark")


def install_wheels() -> str:
    wheels = sorted(glob.glob(str(ROOT / ".whl" / "*.whl")))
    if not wheels:
        return "no wheels in .whl/"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                           str(SITE), *wheels], capture_output=True, text=True)
    if done.returncode != 0:
        return f"pip install failed: {done.stderr.strip()[-500:]}"
    return f"installed {len(wheels)} wheels into {SITE}"


def child_env(work: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled Triton on the GPU
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(SITE), os.environ.get("PYTHONPATH")]))
    env["TRAINER_CACHE_DIR"] = str(work / "cache")  # one token cache shared by every part
    env["PYTHONUNBUFFERED"] = "1"
    return env


def versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def run_part(command: list[str], env: dict, limit: float) -> dict:
    """Runs `command` in its own process group; on timeout the whole group (bench's sides too) is killed."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=limit)
        status = "ok" if proc.returncode == 0 else f"failed (exit code {proc.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        status = f"timed out after {limit:.0f} s"
    print(output[-4000:], flush=True)
    return {"command": " ".join(command), "status": status, "seconds": round(time.perf_counter() - start, 1),
            "output_tail": output[-3000:]}


def kernel_figures(path: Path) -> list[dict] | None:
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return [{"name": b["name"], "median_s": b["stats"]["median"], "extra_info": b.get("extra_info", {})}
            for b in data.get("benchmarks", [])]


def bench_figures(path: Path) -> dict | None:
    """bench.json without the per-step lists a results table does not need (losses stay)."""
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    report.pop("config", None)
    report.pop("rel_loss_diffs", None)
    for side in ("reference", "optimized", "peer"):
        if side in report:
            report[side].pop("step_seconds", None)
    return report


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def json_lines(path: Path) -> list[dict] | None:
    if not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for all parts together")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    suite_start = time.perf_counter()

    wheels = install_wheels()
    sys.path[:0] = [str(SITE), str(ROOT)]
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_suite.py needs a CUDA GPU; on CPU run the benchmark files one by one (benchmarks/README.md)")
    device = torch.cuda.get_device_name(0)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    work = Path("/tmp/gpu_suite")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = child_env(work)
    packages = versions()
    results = {"device": device, "date": date, "torch": torch.__version__, "triton": packages["triton"],
               "cuda": torch.version.cuda, "python": sys.version.split()[0], "packages": packages, "wheels": wheels,
               "budget_s": args.budget, "parts": {}}

    peer = "hf-liger" if packages["liger-kernel"] else "hf" if packages["transformers"] else "none"
    llama_dir = work / "bench-llama-1b"
    # (name, share of the budget in seconds, command, how to read its figures)
    parts = [
        ("kernels", 110, [sys.executable, "-m", "pytest", "benchmarks/bench_kernels.py", "-q", "-p", "no:cacheprovider",
                          f"--benchmark-json={work / 'kernels.json'}"],
         lambda: kernel_figures(work / "kernels.json")),
        ("bench-llama-1b", 190, [sys.executable, "-m", "trainer", "bench", "--model.preset=llama-1b",
                                 "--data.tokenizer=byte", "--train.dtype=bf16", "--train.seq_len=1024",
                                 "--train.micro_batch_size=4", "--train.max_steps=16", "--bench.warmup_steps=4",
                                 f"--bench.peer={peer}", f"--train.output_dir={llama_dir}", "--train.progress=lines",
                                 "--train.log_every=4"],
         lambda: bench_figures(llama_dir / "bench.json")),
        ("e2e", 100, [sys.executable, "-m", "pytest", "benchmarks/bench_e2e.py", "-q", "-p", "no:cacheprovider",
                      "-k", "not peer", f"--benchmark-json={work / 'e2e.json'}"],
         lambda: json_lines(work / "e2e.jsonl")),
        ("parallel", 70, [sys.executable, "benchmarks/bench_parallel.py", f"--json={work / 'parallel.json'}"],
         lambda: read_json(work / "parallel.json")),
        ("optim", 70, [sys.executable, "benchmarks/bench_optim.py", f"--json={work / 'optim.json'}"],
         lambda: read_json(work / "optim.json")),
    ]
    env_e2e = {**env, "BENCH_E2E_PRESET": "small", "BENCH_E2E_STEPS": "12", "BENCH_E2E_RECORD": str(work / "e2e.jsonl")}

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_file = out_dir / f"{slug}-{date}.json"
    for index, (name, _, command, read_figures) in enumerate(parts):
        later = sum(share for _, share, _, _ in parts[index + 1:])
        limit = args.budget - (time.perf_counter() - suite_start) - later
        if limit < 20:
            results["parts"][name] = {"status": "skipped: no time left in the budget"}
        else:
            print(f"== {name} (limit {limit:.0f} s): {' '.join(command)}", flush=True)
            record = run_part(command, env_e2e if name == "e2e" else env, limit)
            record["figures"] = read_figures()
            results["parts"][name] = record
        results["suite_seconds"] = round(time.perf_counter() - suite_start, 1)
        results_file.write_text(json.dumps(results, indent=2) + "\n")
        if os.environ.get("OUT"):
            shutil.copy(results_file, Path(os.environ["OUT"]) / results_file.name)
            if name == "bench-llama-1b" and (llama_dir / "bench.png").is_file():
                shutil.copy(llama_dir / "bench.png", Path(os.environ["OUT"]) / f"{slug}-{date}-bench-llama-1b.png")
    print(f"results: {results_file}")
    for name, record in results["parts"].items():
        print(f"  {name}: {record['status']}" + (f" ({record['seconds']} s)" if "seconds" in record else ""))


if __name__ == "__main__":
    main()
