"""The GPU suite: the compiled kernels tested first, then measured, within one 10-minute call.

    python3 benchmarks/gpu_suite.py [--budget 540] [--out DIR]
    python3 benchmarks/gpu_suite.py --dry-run      # every part's plumbing on CPU at tiny shapes (CI runs it)

1. Installs the wheels carried in .whl/ (/work/shared/gpu/fetch_wheels.sh: liger-kernel, bitsandbytes,
   galore-torch, apollo-torch; the GPU image has torch, triton, transformers) into /tmp/site, put on
   PYTHONPATH with the repository for every part.
2. Runs, each in its own process group under a time limit, in this order:
   - tests: the tests marked gpu (pytest -m gpu tests), then tests/test_kernels_*.py and
     tests/test_ops_*.py, all with TRITON_INTERPRET unset, so every kernel is compiled for the GPU;
   - sync-debug: a short bf16 training run through the public API (Trainer, load_config) whose
     callback sets torch.cuda.set_sync_debug_mode("error") before every step that should read
     nothing back from the GPU (not a log step, not an eval or save step, not the last step) and
     "default" before the others: a host sync in such a step raises, and the part reports it;
   - kernels: benchmarks/bench_kernels.py (ours against eager, torch.compile, torch's own
     F.linear_cross_entropy where this torch has it, and Liger-Kernel where installed);
   - bench-llama-1b: `python -m trainer bench` on the Llama-3.2-1B-shaped preset in bf16 against the
     eager fp32 reference and the Hugging Face peer (with Liger-Kernel when it is installed);
   - e2e: benchmarks/bench_e2e.py on the small preset, peers left out (the Llama run has them);
   - parallel: benchmarks/bench_parallel.py (torch.compile x activation checkpointing);
   - optim: benchmarks/bench_optim.py (memory and speed of every optimizer, the 7B memory table);
   - context: the planner's longest train.seq_len (plan --plan.solve=seq_len) for llama-1b, bf16,
     micro-batch 1, within a 14 GB budget that torch.cuda.set_per_process_memory_fraction makes
     the lent card's limit, for full checkpointing and for full + activation offloading + tiled
     MLP; each trained 2 steps at that length, recording whether it fit (no out-of-memory error),
     max_memory_allocated / max_memory_reserved against the predicted peak, and the step times.
   - float8: llama-1b in bf16 with parallel.compile, trained 12 steps with train.float8=none,
     tensorwise and rowwise (torchao): tokens/s after warm-up and the losses, side by side; without
     torchao the float8 runs are recorded as refused;
   - async-save: benchmarks/bench_async_save.py on a ~0.4B-parameter Llama shape on the GPU: how
     long a save blocks the step with and without checkpoint.async_save.
   A part's limit is what is left of the budget minus the shares of the parts after it, so time a
   part does not use goes to the next. A part that fails or runs out of time is recorded as such and
   the others still run.
3. Writes benchmarks/results/<device>-<date>.json (device, date, versions of torch, triton and the
   other packages, the packages missing, each part's commands, status, seconds, output tail and
   figures) after every part, so a call cut short keeps what finished; when $OUT is set (the lent GPU
   machine's return folder) a copy goes there too. Exits 1 when any part failed.

--dry-run runs the same parts on CPU with tiny shapes (tiny preset, a few steps, kernel benchmarks
at tiny sizes through the Triton interpreter, no torch.compile) into a temporary folder, so that a
typo in any part's plumbing shows in CI rather than on the first GPU call.
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
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITE = Path("/tmp/site")
PACKAGES = (
    "torch",
    "triton",
    "transformers",
    "liger-kernel",
    "bitsandbytes",
    "galore-torch",
    "apollo-torch",
    "peft",
    "accelerate",
    "safetensors",
    "tokenizers",
    "torchao",
    "numpy",
    "matplotlib",
    "tqdm",
    "jinja2",
    "pyarrow",
    "datasets",
    "zstandard",
    "pytest",
    "pytest-benchmark",
)


@dataclass
class Part:
    name: str
    share: float  # seconds of the budget this part may count on
    commands: list[list[str]]  # run one after another; the part fails at the first that fails
    figures: Callable[[list[str]], object] = lambda outputs: None  # from its files, or its commands' outputs
    env: dict = field(default_factory=dict)


def install_wheels() -> str:
    wheels = sorted(glob.glob(str(ROOT / ".whl" / "*.whl")))
    if not wheels:
        return "no wheels in .whl/"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(SITE), *wheels],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        return f"pip install failed: {done.stderr.strip()[-500:]}"
    return f"installed {len(wheels)} wheels into {SITE}"


def child_env(work: Path, dry_run: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled Triton on the GPU
    if dry_run:
        env["TRITON_INTERPRET"] = "1"  # no GPU: the kernels run in the interpreter
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


def run_command(command: list[str], env: dict, limit: float) -> tuple[str, str]:
    """(status, output) of one command in its own process group; on timeout the whole group is killed."""
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=max(1.0, limit))
        status = "ok" if proc.returncode == 0 else f"failed (exit code {proc.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        status = f"timed out after {limit:.0f} s"
    return status, output


def run_part(part: Part, env: dict, limit: float) -> tuple[dict, list[str]]:
    """The part's record, and its commands' outputs."""
    start = time.perf_counter()
    status, outputs = "ok", []
    for command in part.commands:
        left = limit - (time.perf_counter() - start)
        status, output = run_command(command, {**env, **part.env}, left)
        print(output[-4000:], flush=True)
        outputs.append(output)
        if status != "ok":
            break
    record = {
        "commands": [" ".join(c) for c in part.commands],
        "status": status,
        "seconds": round(time.perf_counter() - start, 1),
        "output_tail": "\n".join(o[-3000:] for o in outputs)[-6000:],
    }
    return record, outputs


# ---- reading each part's figures ----


def pytest_summary(output: str) -> str | None:
    lines = [line.strip("= ") for line in output.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    return lines[-1] if lines else None


def kernel_figures(path: Path) -> list[dict] | None:
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return [
        {"name": b["name"], "median_s": b["stats"]["median"], "extra_info": b.get("extra_info", {})}
        for b in data.get("benchmarks", [])
    ]


def bench_figures(path: Path) -> dict | None:
    """bench.json without the per-step lists a results table does not need (losses stay)."""
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    report.pop("config", None)
    report.pop("rel_loss_diffs", None)
    for side in ("reference", "optimized", "peer"):
        if isinstance(report.get(side), dict):
            report[side].pop("step_seconds", None)
    return report


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def json_lines(path: Path) -> list[dict] | None:
    if not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- the parts ----


def build_parts(work: Path, dry_run: bool, packages: dict) -> list[Part]:
    py = sys.executable
    pytest = [py, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider"]
    kernel_and_op_tests = sorted(
        str(Path(p).relative_to(ROOT))
        for pattern in ("test_kernels_*.py", "test_ops_*.py")
        for p in glob.glob(str(ROOT / "tests" / pattern))
    )
    if dry_run:  # the interpreter is slow: one file shows the command works
        kernel_and_op_tests = ["tests/test_kernels_swiglu.py"]

    sync_dir = work / "sync-debug"
    sync = [py, str(Path(__file__).resolve()), "--sync-debug-run", str(sync_dir)] + (["--dry-run"] if dry_run else [])

    kernels_json = work / "kernels.json"
    kernels = [*pytest, "benchmarks/bench_kernels.py", "-k", "gpu_kernel", f"--benchmark-json={kernels_json}"]

    llama_dir = work / "bench-llama-1b"
    if dry_run:
        peer = "hf" if packages["transformers"] else "none"
        bench = [
            "--model.preset=tiny",
            "--train.dtype=fp32",
            "--train.seq_len=64",
            "--train.micro_batch_size=2",
            "--train.max_steps=3",
            "--bench.warmup_steps=1",
        ]
    else:
        peer = "hf-liger" if packages["liger-kernel"] else "hf" if packages["transformers"] else "none"
        bench = [
            "--model.preset=llama-1b",
            "--train.dtype=bf16",
            "--train.seq_len=1024",
            "--train.micro_batch_size=4",
            "--train.max_steps=12",
            "--bench.warmup_steps=3",
        ]
    bench = [
        py,
        "-m",
        "trainer",
        "bench",
        *bench,
        "--data.tokenizer=byte",
        f"--bench.peer={peer}",
        f"--train.output_dir={llama_dir}",
        "--train.progress=lines",
        "--train.log_every=4",
    ]

    e2e_record = work / "e2e.jsonl"
    e2e_env = {
        "BENCH_E2E_RECORD": str(e2e_record),
        "BENCH_E2E_PRESET": "tiny" if dry_run else "small",
        "BENCH_E2E_STEPS": "4" if dry_run else "12",
    }  # bench_e2e warms up 3 steps
    if dry_run:
        e2e_env.update(BENCH_E2E_SEQ_LEN="64", BENCH_E2E_BATCH="2")
    e2e = [
        *pytest,
        "benchmarks/bench_e2e.py",
        "-k",
        "fp32-kernels and not peer" if dry_run else "not peer",
        f"--benchmark-json={work / 'e2e.json'}",
    ]

    parallel_json = work / "parallel.json"
    parallel = [py, "benchmarks/bench_parallel.py", f"--json={parallel_json}"]
    if dry_run:
        parallel += ["--preset=tiny", "--steps=1", "--warmup=0", "--seq-len=64", "--batch=2", "--device=cpu"]

    optim_json = work / "optim.json"
    optim = [py, "benchmarks/bench_optim.py"] + (["--predict-only"] if dry_run else [f"--json={optim_json}"])

    context_dir = work / "context"
    context = [py, str(Path(__file__).resolve()), "--context-run", str(context_dir)] + (
        ["--dry-run"] if dry_run else []
    )

    float8_dir = work / "float8"
    float8 = [py, str(Path(__file__).resolve()), "--float8-run", str(float8_dir)] + (["--dry-run"] if dry_run else [])

    async_json = work / "async_save.json"
    async_save = [py, "benchmarks/bench_async_save.py", f"--json={async_json}"]
    if dry_run:
        async_save += ["--preset=tiny", "--repeats=1"]
    else:  # 24 layers of 1024 (0.4B parameters with AdamW's states: ~6.4 GB to copy per save)
        shape = ["--model.hidden_size=1024", "--model.intermediate_size=2816", "--model.n_layers=24"]
        async_save += ["--repeats=3", "--", *shape, "--model.n_heads=16", "--model.n_kv_heads=8", "--train.device=cuda"]

    gpu_tests = [*pytest, "-m", "gpu", "tests"]
    other_tests = [*pytest, "-m", "not gpu", *kernel_and_op_tests]
    return [
        Part(
            "tests",
            150,
            [gpu_tests, other_tests],
            lambda outputs: dict(zip(("gpu-marked", "kernels-and-ops"), map(pytest_summary, outputs), strict=False)),
        ),
        Part("sync-debug", 40, [sync], lambda outputs: read_json(sync_dir / "sync_debug.json")),
        Part(
            "kernels",
            80,
            [kernels],
            lambda outputs: kernel_figures(kernels_json),
            {"BENCH_KERNELS_DRY_RUN": "1"} if dry_run else {},
        ),
        Part("bench-llama-1b", 120, [bench], lambda outputs: bench_figures(llama_dir / "bench.json")),
        Part("e2e", 55, [e2e], lambda outputs: json_lines(e2e_record), e2e_env),
        Part("parallel", 50, [parallel], lambda outputs: read_json(parallel_json)),
        Part("optim", 45, [optim], lambda outputs: read_json(optim_json)),
        Part("context", 60, [context], lambda outputs: read_json(context_dir / "context.json")),
        Part("float8", 60, [float8], lambda outputs: read_json(float8_dir / "float8.json")),
        Part("async-save", 40, [async_save], lambda outputs: read_json(async_json)),
    ]


# ---- the sync-debug run (a child process of the suite) ----


def sync_debug_run(out_dir: Path, dry_run: bool) -> int:
    """Trains a few steps through the public API with host syncs made errors where none should happen."""
    import torch

    from trainer import Trainer, load_config
    from trainer.callbacks import TrainerCallback

    cuda = torch.cuda.is_available()

    class SyncDebug(TrainerCallback):
        """Sync debug mode "error" for the steps between reads, "default" for the steps that read back."""

        def __init__(self):
            self.quiet_steps, self.current = [], 0

        def on_step_begin(self, config, state, control, **kwargs):
            t, step = config.train, state.step + 1
            save_every = config.checkpoint.save_every
            reads_back = (
                step % t.log_every == 0
                or step == t.max_steps
                or (t.eval_every and step % t.eval_every == 0)
                or (save_every and step % save_every == 0)
            )
            self.current = step
            if not reads_back:
                self.quiet_steps.append(step)
            if cuda:
                torch.cuda.set_sync_debug_mode("default" if reads_back else "error")

        def on_train_end(self, config, state, control, **kwargs):
            if cuda:
                torch.cuda.set_sync_debug_mode("default")

    size = (
        [
            "--model.preset=tiny",
            "--train.seq_len=32",
            "--train.micro_batch_size=2",
            "--train.max_steps=4",
            "--train.log_every=2",
            "--train.dtype=fp32",
            "--train.device=cpu",
        ]
        if dry_run
        else [
            "--model.preset=small",
            "--train.seq_len=256",
            "--train.micro_batch_size=8",
            "--train.max_steps=12",
            "--train.log_every=4",
            "--train.dtype=bf16",
        ]
    )
    config = load_config(
        None,
        [
            *size,
            "--data.tokenizer=byte",
            "--train.grad_accum_steps=2",
            "--train.eval_every=0",
            "--checkpoint.save_every=0",
            "--train.progress=none",
            "--train.overwrite=true",
            f"--train.output_dir={out_dir / 'run'}",
        ],
    )
    callback = SyncDebug()
    report = {
        "sync_debug_mode": "error on quiet steps" if cuda else "not available without CUDA (dry run)",
        "max_steps": config.train.max_steps,
        "log_every": config.train.log_every,
    }
    try:
        state = Trainer(config, callbacks=[callback]).train()
        report.update(passed=True, steps=state.step, quiet_steps=callback.quiet_steps)
    except Exception as error:  # a sync in a quiet step, or the run failing for any other reason
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
        report.update(
            passed=False,
            failed_in_step=callback.current,
            quiet_steps=callback.quiet_steps,
            error=f"{type(error).__name__}: {error}"[:2000],
            traceback=traceback.format_exc()[-3000:],
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sync_debug.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "traceback"}))
    return 0 if report["passed"] else 1


# ---- the context run (a child process of the suite) ----

# A 14 GB card emulated on the lent one: the planner plans for plan.budget, and the caching allocator
# is held to it minus the CUDA context (which it does not count), so "fits" means what it would there.
CONTEXT_BUDGET = 14_000_000_000
CONTEXT_RUNGS = {
    "full checkpointing": ["--parallel.activation_checkpointing=full"],
    "full + offloading + tiled MLP (16)": [
        "--parallel.activation_checkpointing=full",
        "--parallel.activation_offloading=true",
        "--parallel.tiled_mlp=16",
    ],
}


def context_run(out_dir: Path, dry_run: bool) -> int:
    """Trains llama-1b (the tiny preset with --dry-run, on CPU) at the planner's longest seq_len for
    each rung and records whether it fit and what the allocator measured. Exits 1 when a run the
    planner said fits ran out of memory."""
    import gc

    import torch

    from trainer import Trainer, load_config
    from trainer.callbacks import TrainerCallback
    from trainer.plan import predict_peak
    from trainer.plan.choose import longest_seq_len
    from trainer.plan.devices import CPU_RUNTIME_BYTES, CUDA_CONTEXT_BYTES, budget_bytes, resolve_device

    cuda = torch.cuda.is_available() and not dry_run
    out_dir.mkdir(parents=True, exist_ok=True)
    if cuda:
        base = ["--model.preset=llama-1b", "--train.dtype=bf16", "--train.param_dtype=bf16", "--plan.device=auto"]
        budget = CONTEXT_BUDGET
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, (budget - CUDA_CONTEXT_BYTES) / total))
    else:  # the plumbing: the tiny model on CPU, a budget its longest context is bound by
        base = ["--model.preset=tiny", "--train.dtype=fp32", "--train.device=cpu", "--plan.device=cpu"]
        budget = CPU_RUNTIME_BYTES + 12 * 2**20

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.seconds, self.start = [], 0.0

        def on_step_begin(self, config, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, config, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.seconds.append(round(time.perf_counter() - self.start, 3))

    report = {"device": torch.cuda.get_device_name(0) if cuda else "cpu (dry run)", "budget_bytes": budget, "runs": []}
    failed = False
    for rung, flags in CONTEXT_RUNGS.items():
        argv = [
            *base,
            *flags,
            "--train.micro_batch_size=1",
            "--train.seq_len=2048",
            f"--plan.budget={budget}",
            "--data.tokenizer=byte",
            "--train.max_steps=2",
            "--train.eval_every=0",
            "--train.eval_batches=1",
            "--checkpoint.save_every=0",
            "--train.progress=none",
            "--train.overwrite=true",
            f"--train.output_dir={out_dir / 'run'}",
        ]
        config = load_config(None, argv)
        answer = longest_seq_len(config, budget_bytes(config, resolve_device(config)))
        record = {"rung": rung, "seq_len": answer.seq_len, "limit": answer.limit}
        report["runs"].append(record)
        if not answer.seq_len:
            record.update(fit=None, error="the planner says nothing fits")
            continue
        config = load_config(None, [*argv, f"--train.seq_len={answer.seq_len}"])
        plan = predict_peak(config)
        record.update(predicted_peak_bytes=plan.peak_bytes, predicted_required_bytes=plan.required_bytes)
        timer = StepTimes()
        gc.collect()  # what an earlier rung's failed run left
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            Trainer(config, callbacks=[timer]).train()
            record["fit"] = True
        except Exception as error:  # recorded, and the next rung still runs
            out_of_memory = isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()
            record.update(
                fit=False if out_of_memory else None,
                error=f"{type(error).__name__}: {error}"[:1000],
                traceback=traceback.format_exc()[-2000:],
            )
            failed = True
        record["step_seconds"] = timer.seconds
        if cuda:
            record.update(
                max_memory_allocated=torch.cuda.max_memory_allocated(),
                max_memory_reserved=torch.cuda.max_memory_reserved(),
            )
            record["allocated_over_predicted"] = round(record["max_memory_allocated"] / plan.peak_bytes, 4)
        print(json.dumps({k: v for k, v in record.items() if k != "traceback"}), flush=True)
        # after each rung: a part cut short by its time limit keeps the rungs that finished
        (out_dir / "context.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "context.json").write_text(json.dumps(report, indent=2) + "\n")
    return 1 if failed else 0


FLOAT8_RECIPES = ("none", "tensorwise", "rowwise")


def float8_run(out_dir: Path, dry_run: bool) -> int:
    """Trains llama-1b in bf16, compiled, with each train.float8 recipe (the tiny preset in fp32 on
    CPU with --dry-run, where float8 must be refused) and records tokens/s and losses. Exits 1 when
    a run fails other than by float8's own refusal."""
    import torch

    from trainer import Trainer, load_config
    from trainer.errors import ConfigError
    from trainer.metrics import read_metrics

    cuda = torch.cuda.is_available() and not dry_run
    out_dir.mkdir(parents=True, exist_ok=True)
    if cuda:
        base = ["--model.preset=llama-1b", "--train.dtype=bf16", "--parallel.compile=true", "--train.seq_len=1024"]
        base += ["--train.micro_batch_size=4", "--train.max_steps=12", "--train.log_every=4"]
    else:
        base = ["--model.preset=tiny", "--train.dtype=fp32", "--train.device=cpu", "--train.seq_len=64"]
        base += ["--train.micro_batch_size=2", "--train.max_steps=2", "--train.log_every=1"]
    report = {"device": torch.cuda.get_device_name(0) if cuda else "cpu (dry run)", "runs": []}
    failed = False
    for recipe in FLOAT8_RECIPES:
        folder = out_dir / recipe
        argv = [
            *base,
            f"--train.float8={recipe}",
            "--data.tokenizer=byte",
            "--train.eval_every=0",
            "--train.eval_batches=1",
            "--checkpoint.save_every=0",
            "--train.progress=none",
            "--train.overwrite=true",
            f"--train.output_dir={folder}",
        ]
        record = {"recipe": recipe}
        report["runs"].append(record)
        try:
            Trainer(load_config(None, argv)).train()
            steps = [r for r in read_metrics(folder / "metrics.jsonl") if "loss" in r]
            speeds = [r["tokens_per_s"] for r in steps if r.get("tokens_per_s")]
            record.update(losses=[round(r["loss"], 5) for r in steps], tokens_per_s=speeds[-1] if speeds else None)
        except ConfigError as refusal:  # float8 off CUDA, or without torchao
            record["refused"] = str(refusal)
            failed |= recipe == "none"
        except Exception as error:
            record.update(error=f"{type(error).__name__}: {error}"[:1000], traceback=traceback.format_exc()[-2000:])
            failed = True
        print(json.dumps({k: v for k, v in record.items() if k != "traceback"}), flush=True)
        (out_dir / "float8.json").write_text(json.dumps(report, indent=2) + "\n")
    return 1 if failed else 0


# ---- the suite ----


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds for all parts together (default 540; 900 with --dry-run)"
    )
    parser.add_argument("--out", help="results folder (default benchmarks/results; a temporary one with --dry-run)")
    parser.add_argument("--dry-run", action="store_true", help="every part on CPU at tiny shapes")
    parser.add_argument("--sync-debug-run", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--context-run", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--float8-run", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sync_debug_run:
        sys.path[:0] = [str(SITE), str(ROOT)]
        return sync_debug_run(Path(args.sync_debug_run), args.dry_run)
    if args.context_run:
        sys.path[:0] = [str(SITE), str(ROOT)]
        return context_run(Path(args.context_run), args.dry_run)
    if args.float8_run:
        sys.path[:0] = [str(SITE), str(ROOT)]
        return float8_run(Path(args.float8_run), args.dry_run)

    suite_start = time.perf_counter()
    budget = args.budget or (900.0 if args.dry_run else 540.0)
    wheels = "dry run: .whl/ not installed" if args.dry_run else install_wheels()
    sys.path[:0] = [str(SITE), str(ROOT)]
    import torch

    if args.dry_run:
        device = "cpu-dry-run"
    elif not torch.cuda.is_available():
        sys.exit("gpu_suite.py needs a CUDA GPU; --dry-run runs its plumbing on CPU")
    else:
        device = torch.cuda.get_device_name(0)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    work = Path(tempfile.mkdtemp(prefix="gpu_suite-"))
    env = child_env(work, args.dry_run)
    packages = versions()
    results = {
        "device": device,
        "date": date,
        "dry_run": args.dry_run,
        "torch": torch.__version__,
        "triton": packages["triton"],
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "packages": packages,
        "missing_packages": sorted(k for k, v in packages.items() if v is None),
        "wheels": wheels,
        "budget_s": budget,
        "parts": {},
    }

    parts = build_parts(work, args.dry_run, packages)
    if args.out:
        out_dir = Path(args.out)
    elif args.dry_run:
        out_dir = work / "results"
    else:
        out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    results_file = out_dir / f"{slug}-{date}.json"
    for index, part in enumerate(parts):
        later = sum(p.share for p in parts[index + 1 :])
        limit = budget - (time.perf_counter() - suite_start) - later
        if limit < 20:
            results["parts"][part.name] = {"status": "skipped: no time left in the budget"}
        else:
            print(
                f"== {part.name} (limit {limit:.0f} s): {' && '.join(' '.join(c) for c in part.commands)}", flush=True
            )
            record, outputs = run_part(part, env, limit)
            try:
                record["figures"] = part.figures(outputs)
            except (OSError, ValueError, KeyError) as error:  # a part that died mid-write
                record["figures"] = f"unreadable: {error}"
            results["parts"][part.name] = record
        results["suite_seconds"] = round(time.perf_counter() - suite_start, 1)
        results_file.write_text(json.dumps(results, indent=2) + "\n")
        if os.environ.get("OUT"):
            shutil.copy(results_file, Path(os.environ["OUT"]) / results_file.name)
            png = work / "bench-llama-1b" / "bench.png"
            if part.name == "bench-llama-1b" and png.is_file():
                shutil.copy(png, Path(os.environ["OUT"]) / f"{slug}-{date}-bench-llama-1b.png")
    print(f"results: {results_file}")
    for name, record in results["parts"].items():
        print(f"  {name}: {record['status']}" + (f" ({record['seconds']} s)" if "seconds" in record else ""))
    if results["missing_packages"]:
        print(f"  missing packages: {', '.join(results['missing_packages'])}")
    return 0 if all(r["status"] == "ok" for r in results["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
