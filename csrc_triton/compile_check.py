"""Every Triton kernel of this package compiled ahead of time for real model shapes; no GPU needed.

    python -m csrc_triton.compile_check [--arch sm_80,sm_90a] [--json PATH]
                                        [--models llama-8b,...] [--dtypes bf16,...] [--kernels rope,...] [--jobs N]

The launch helpers themselves choose what is compiled: each is called with meta tensors (shapes and
dtypes, no memory) of a model's shapes while csrc_triton._common.launch_hook records the launch it
would make (kernel, block sizes, num_warps, argument types and the integer specialisations Triton's
launcher applies) instead of running it. The check and the launchers therefore cannot drift apart.
Each distinct kernel is then compiled by `triton.compile` for each architecture (Triton ships its
own ptxas, so this runs on any Linux machine), and ptxas's report gives registers per thread and
spill bytes. A configuration fails when it does not compile, spills, or exceeds an architecture's
limits (255 registers a thread, 65536 a block, the block's shared memory, 1024 threads).

Writes one JSON record per (kernel launch, model, dtype, arch) with --json; exits 1 when any fails.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch


@dataclasses.dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


# Published configs (the models' config.json files on the Hugging Face hub). llama-1b/7b/8b are
# trainer.models' presets (tests/test_compile_check.py keeps them equal); vocab-256k has Gemma-7B's
# shape, the largest vocabulary and head_dim in common use; llama-405b is the widest hidden size.
# Gemma 2, Qwen3 and Phi-4-mini are the newer families' widths (Phi-4-mini's head_dim is
# 3072 / 24 heads; its RoPE rotates 96 of those 128 dimensions). For the mixtures of experts
# (Mixtral-8x7B, Qwen3-30B-A3B) `intermediate` is one expert's width: the gated activation runs on
# the token copies routed to the experts, rows of that width.
MODELS: dict[str, ModelShape] = {
    "llama-1b": ModelShape(2048, 8192, 32, 8, 64, 128256),
    "llama-7b": ModelShape(4096, 11008, 32, 32, 128, 32000),
    "llama-8b": ModelShape(4096, 14336, 32, 8, 128, 128256),
    "llama-70b": ModelShape(8192, 28672, 64, 8, 128, 128256),
    "qwen2-7b": ModelShape(3584, 18944, 28, 4, 128, 152064),
    "vocab-256k": ModelShape(3072, 24576, 16, 16, 256, 256000),
    "llama-405b": ModelShape(16384, 53248, 128, 8, 128, 128256),
    "gemma2-9b": ModelShape(3584, 14336, 16, 8, 256, 256000),
    "gemma2-27b": ModelShape(4608, 36864, 32, 16, 128, 256000),
    "qwen3-8b": ModelShape(4096, 12288, 32, 8, 128, 151936),
    "qwen3-32b": ModelShape(5120, 25600, 64, 8, 128, 151936),
    "phi-4-mini": ModelShape(3072, 8192, 24, 8, 128, 200064),
    "mixtral-8x7b": ModelShape(4096, 14336, 32, 8, 128, 32000),
    "qwen3-30b-a3b": ModelShape(2048, 768, 32, 4, 128, 151936),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BATCH, SEQ = 4, 2048  # 8192 tokens through the row-wise kernels
CE_ROWS = 1024  # tokens in one chunk of the fused loss
# qk_norm: RMSNorm over each head of q (Qwen3, Gemma 3), head_dim wide. Each RMSNorm is recorded in
# Llama's form and in Gemma's (offset 1, fp32 until the output); geglu is the gated kernel's tanh-GELU.
KERNELS = ("rms_norm", "add_rms_norm", "qk_norm", "rope", "swiglu", "geglu", "cross_entropy")
NORM_VARIANTS = {"": dict(), "gemma_": dict(offset=1.0, round_normed=False)}

# Largest dynamic shared memory one block may use, by compute capability (CUDA programming guide,
# "Technical Specifications per Compute Capability").
SHARED_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
MAX_REGISTERS_PER_THREAD = 255
REGISTERS_PER_BLOCK = 65536
MAX_THREADS_PER_BLOCK = 1024
TRITON_TYPES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
}


@dataclasses.dataclass
class Launch:
    """One recorded launch: what to compile, and what it was for."""

    kernel: str  # the op and direction, e.g. "rms_norm.backward"
    model: str
    dtype: str
    shape: str  # the launcher's own description of the problem
    module: str
    function: str
    signature: dict
    constexprs: dict
    divisible: tuple  # indices of the arguments Triton would mark divisible by 16
    num_warps: int
    num_stages: int | None

    def compile_key(self, arch: str) -> tuple:
        return (
            self.module,
            self.function,
            tuple(self.signature.items()),
            tuple(self.constexprs.items()),
            self.divisible,
            self.num_warps,
            self.num_stages,
            arch,
        )


def _specialize(kernel, args: tuple, meta: dict):
    """Signature, constexprs and divisibility the way Triton's launcher derives them from the values
    (triton/runtime/jit.py: an int equal to 1 becomes a constant, ints and pointers divisible by 16
    are marked so; PyTorch allocations are 16-byte aligned)."""
    signature, constexprs, divisible = {}, {}, []
    for index, name in enumerate(kernel.arg_names):
        if index < len(args):
            value = args[index]
        elif name in meta:
            signature[name] = "constexpr"
            constexprs[name] = meta[name]
            continue
        else:
            raise TypeError(f"{kernel.__name__}: no value for argument {name}")
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + TRITON_TYPES[value.dtype]
            divisible.append(index)
        elif isinstance(value, bool):
            signature[name] = "u1"
        elif isinstance(value, int):
            if value == 1:
                signature[name] = "constexpr"
                constexprs[name] = 1
                continue
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                divisible.append(index)
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value is None:
            signature[name] = "constexpr"
            constexprs[name] = None
        else:
            raise TypeError(f"{kernel.__name__}: cannot type argument {name}={value!r}")
    return signature, constexprs, tuple(divisible)


@contextlib.contextmanager
def _recording(into: list, kernel_label: str, model: str, dtype: str):
    from csrc_triton import _common

    def record(kernel, grid, args, meta, shape):
        meta = dict(meta)
        num_warps, num_stages = meta.pop("num_warps", 4), meta.pop("num_stages", None)
        signature, constexprs, divisible = _specialize(kernel, args, meta)
        into.append(
            Launch(
                kernel_label,
                model,
                dtype,
                shape,
                kernel.fn.__module__,
                kernel.fn.__name__,
                signature,
                constexprs,
                divisible,
                num_warps,
                num_stages,
            )
        )

    previous, _common.launch_hook = _common.launch_hook, record
    try:
        yield
    finally:
        _common.launch_hook = previous


def _meta(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def launches(models=tuple(MODELS), dtypes=tuple(DTYPES), kernels=KERNELS) -> list[Launch]:
    """Every launch the launch helpers make for the forward and backward of each model, in each dtype."""
    from csrc_triton.cross_entropy import cross_entropy_rows_
    from csrc_triton.rms_norm import rms_norm_backward, rms_norm_forward
    from csrc_triton.rope import rope_rotate
    from csrc_triton.swiglu import GELU_TANH, SILU, swiglu_backward, swiglu_forward

    out: list[Launch] = []
    for model in models:
        m = MODELS[model]
        for dtype_name in dtypes:
            dt = DTYPES[dtype_name]
            rows = BATCH * SEQ

            def rec(label, _model=model, _dtype=dtype_name):
                return _recording(out, label, _model, _dtype)

            x, r, w = _meta(rows, m.hidden, dtype=dt), _meta(rows, m.hidden, dtype=dt), _meta(m.hidden, dtype=dt)
            rstd = _meta(rows, dtype=torch.float32)
            q_heads = _meta(rows * m.heads, m.head_dim, dtype=dt)
            q_w, q_rstd = _meta(m.head_dim, dtype=dt), _meta(rows * m.heads, dtype=torch.float32)
            for prefix, variant in NORM_VARIANTS.items():
                if "rms_norm" in kernels:
                    with rec(f"{prefix}rms_norm.forward"):
                        rms_norm_forward(x, w, 1e-5, **variant)
                    with rec(f"{prefix}rms_norm.backward"):
                        rms_norm_backward(x, x, w, rstd, **variant)
                if "add_rms_norm" in kernels:
                    with rec(f"{prefix}add_rms_norm.forward"):
                        rms_norm_forward(x, w, 1e-5, residual=r, **variant)
                    with rec(f"{prefix}add_rms_norm.backward"):
                        rms_norm_backward(x, x, w, rstd, r, **variant)
                if "qk_norm" in kernels:
                    with rec(f"{prefix}qk_norm.forward"):
                        rms_norm_forward(q_heads, q_w, 1e-6, **variant)
                    with rec(f"{prefix}qk_norm.backward"):
                        rms_norm_backward(q_heads, q_heads, q_w, q_rstd, **variant)
            if "rope" in kernels:
                # The model's layout: (batch, seq, heads, dim) projections viewed as (batch, heads, seq, dim).
                q = _meta(BATCH, SEQ, m.heads, m.head_dim, dtype=dt).transpose(1, 2)
                k = _meta(BATCH, SEQ, m.kv_heads, m.head_dim, dtype=dt).transpose(1, 2)
                cos = sin = _meta(SEQ, m.head_dim, dtype=torch.float32)  # the model's fp32 tables
                with rec("rope.forward"):
                    rope_rotate(q, k, cos, sin)
                with rec("rope.backward"):
                    rope_rotate(q, k, cos, sin, inverse=True)
            for name, activation in (("swiglu", SILU), ("geglu", GELU_TANH)):
                if name in kernels:
                    gate = _meta(rows, m.intermediate, dtype=dt)
                    with rec(f"{name}.forward"):
                        swiglu_forward(gate, gate, activation)
                    with rec(f"{name}.backward"):
                        swiglu_backward(gate, gate, gate, activation)
            if "cross_entropy" in kernels:
                logits = _meta(CE_ROWS, m.vocab, dtype=dt)
                labels = _meta(CE_ROWS, dtype=torch.int64)
                losses = _meta(CE_ROWS, dtype=torch.float32)
                with rec("cross_entropy.loss_and_grad"):  # training, reduction mean or sum
                    cross_entropy_rows_(logits, labels, loss_out=losses)
                with rec("cross_entropy.loss"):  # evaluation, no gradient
                    cross_entropy_rows_(logits, labels, loss_out=losses, compute_grad=False)
                with rec("cross_entropy.grad_scaled"):  # reduction none: the backward's recompute
                    cross_entropy_rows_(logits, labels, row_scale=losses)
                with rec("cross_entropy.all_options"):
                    cross_entropy_rows_(
                        logits,
                        labels,
                        bias=_meta(m.vocab, dtype=dt),
                        loss_out=losses,
                        label_smoothing=0.1,
                        z_loss=1e-4,
                        softcap=30.0,
                    )
    return out


def parse_arch(text: str) -> int:
    match = re.fullmatch(r"sm_(\d+)a?", text.strip())
    if not match:
        raise ValueError(f"architecture {text!r}: expected sm_<capability>, e.g. sm_80 or sm_90a")
    return int(match.group(1))


def arch_label(capability: int) -> str:
    # Triton compiles capability 90 and above for the "a" variant (sm_90a: wgmma, setmaxnreg).
    return f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"


def _ast_source(kernel, launch: Launch, target):
    """triton.compiler.ASTSource for the launch, in the form this Triton version takes."""
    from triton.compiler import ASTSource

    if "constexprs" in inspect.signature(ASTSource.__init__).parameters:  # triton >= 3.3
        attrs = {(i,): [["tt.divisibility", 16]] for i in launch.divisible}
        return ASTSource(kernel, dict(launch.signature), dict(launch.constexprs), attrs)
    # triton 3.2: constants by name, an AttrsDescriptor built from values, no constexpr signature entries.
    from triton.compiler import make_backend

    class _Aligned:  # stands in for a divisible value when the descriptor inspects it
        def __init__(self, divisible):
            self.divisible = divisible

        def data_ptr(self):
            return 0 if self.divisible else 8

    values = [launch.constexprs.get(name, _Aligned(i in launch.divisible)) for i, name in enumerate(kernel.arg_names)]
    for i, name in enumerate(kernel.arg_names):
        if launch.signature[name] in ("i32", "i64"):
            values[i] = 16 if i in launch.divisible else 17
    attrs = make_backend(target).get_attrs_descriptor(kernel.params, values)
    signature = {k: v for k, v in launch.signature.items() if v != "constexpr"}
    return ASTSource(kernel, signature, dict(launch.constexprs), attrs)


PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_report(ptx: str, arch: int, log: str) -> tuple[int, int]:
    """(registers, spill store bytes) from ptxas's verbose log: the one Triton printed while compiling
    (triton >= 3.5), else from running Triton's ptxas again on the kernel's PTX."""
    if not PTXAS_REGISTERS.search(log):
        import triton

        bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
        ptxas = os.environ.get("TRITON_PTXAS_PATH") or str(bin_dir / "ptxas")
        suffix = "a" if arch >= 90 else ""
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "k.ptx"
            src.write_text(ptx)
            done = subprocess.run(
                [ptxas, "-v", "-lineinfo", f"--gpu-name=sm_{arch}{suffix}", str(src), "-o", str(Path(tmp) / "k.o")],
                capture_output=True,
                text=True,
            )
            log = done.stdout + done.stderr
    registers = PTXAS_REGISTERS.search(log)
    spills = PTXAS_SPILLS.search(log)
    if registers is None or spills is None:
        raise RuntimeError(f"no register report in ptxas's output: {log.strip()[:200]}")
    return int(registers.group(1)), int(spills.group(1))


def compile_one(launch: Launch, arch: int) -> dict:
    """Compiles one launch for one architecture: registers, spills, shared memory, or the error."""
    import triton

    try:
        from triton.backends.compiler import GPUTarget
    except ImportError:  # triton 3.2
        from triton.compiler.compiler import GPUTarget

    kernel = getattr(importlib.import_module(launch.module), launch.function)
    target = GPUTarget("cuda", arch, 32)
    options = {"num_warps": launch.num_warps}
    if launch.num_stages is not None:
        options["num_stages"] = launch.num_stages
    knobs = getattr(triton, "knobs", None)
    nvidia_knobs = getattr(knobs, "nvidia", None)
    captured = io.StringIO()
    try:
        if nvidia_knobs is not None and hasattr(nvidia_knobs, "dump_ptxas_log"):
            nvidia_knobs.dump_ptxas_log = True
        with contextlib.redirect_stdout(captured):
            compiled = triton.compile(_ast_source(kernel, launch, target), target=target, options=options)
        registers, spill_bytes = _ptxas_report(compiled.asm["ptx"], arch, captured.getvalue())
    except Exception as error:  # reported per configuration, one line each
        message = " ".join(str(error).split())[:400]
        return {"ok": False, "error": f"{type(error).__name__}: {message}"}
    metadata = compiled.metadata
    return {
        "ok": True,
        "registers": registers,
        "spill_bytes": spill_bytes,
        "shared_bytes": int(metadata.shared),
        "num_stages": int(metadata.num_stages),
        "num_warps": int(metadata.num_warps),
    }


def check_limits(result: dict, arch: int) -> str | None:
    """Why a compiled configuration cannot run (or would run slowly) on `arch`, or None."""
    threads = result["num_warps"] * 32
    problems = []
    if result["spill_bytes"]:
        problems.append(f"spills {result['spill_bytes']} bytes to local memory")
    if result["registers"] > MAX_REGISTERS_PER_THREAD:
        problems.append(f"{result['registers']} registers a thread > {MAX_REGISTERS_PER_THREAD}")
    if result["registers"] * threads > REGISTERS_PER_BLOCK:
        problems.append(f"{result['registers']} registers x {threads} threads > {REGISTERS_PER_BLOCK}")
    if threads > MAX_THREADS_PER_BLOCK:
        problems.append(f"{threads} threads a block > {MAX_THREADS_PER_BLOCK}")
    shared_limit = SHARED_LIMIT.get(arch, min(SHARED_LIMIT.values()))
    if result["shared_bytes"] > shared_limit:
        problems.append(f"{result['shared_bytes']} bytes shared memory > {shared_limit}")
    return "; ".join(problems) or None


def _compile_job(job):
    launch, arch = job
    return compile_one(launch, arch)


def run(launch_list: list[Launch], archs: list[int], jobs: int) -> tuple[list[dict], int]:
    """Compiles each distinct (kernel, signature, constants, warps, arch) once; one record per launch and arch."""
    unique: dict[tuple, tuple[Launch, int]] = {}
    for launch in launch_list:
        for arch in archs:
            unique.setdefault(launch.compile_key(arch), (launch, arch))
    keys = list(unique)
    if jobs > 1 and len(keys) > 1:
        import multiprocessing

        # fork: the workers inherit the imported modules instead of importing torch and triton again.
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            results = dict(zip(keys, pool.map(_compile_job, [unique[k] for k in keys]), strict=True))
    else:
        results = {key: _compile_job(unique[key]) for key in keys}

    records = []
    for launch in launch_list:
        for arch in archs:
            result = results[launch.compile_key(arch)]
            label = arch_label(arch)
            blocks = {k: v for k, v in launch.constexprs.items() if k.startswith(("BLOCK", "ONE_BLOCK"))}
            flags = {k: v for k, v in launch.constexprs.items() if k.isupper() and k not in blocks}
            record = {
                "kernel": launch.kernel,
                "function": launch.function,
                "arch": label,
                "dtype": launch.dtype,
                "model": launch.model,
                "shape": launch.shape,
                "blocks": blocks,
                "flags": flags,
                "num_warps": launch.num_warps,
                "num_stages": result.get("num_stages"),
                "registers": result.get("registers"),
                "spill_bytes": result.get("spill_bytes"),
                "shared_bytes": result.get("shared_bytes"),
                "ok": result["ok"],
            }
            if not result["ok"]:
                record["error"] = f"{launch.function} for {launch.model} ({launch.shape}) on {label}: {result['error']}"
            else:
                problem = check_limits(result, arch)
                if problem:
                    record["ok"] = False
                    record["error"] = f"{launch.function} for {launch.model} ({launch.shape}) on {label}: {problem}"
            records.append(record)
    return records, len(keys)


def _csv(text: str, allowed, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in items if t not in allowed]
    if unknown:
        raise SystemExit(f"error: unknown {what} {', '.join(unknown)}; choose from {', '.join(allowed)}")
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m csrc_triton.compile_check", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="sm_80,sm_90a", help="comma list, e.g. sm_80,sm_90a")
    parser.add_argument("--json", help="write every record and the summary to this file")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma list of bf16, fp16, fp32")
    parser.add_argument("--kernels", default=",".join(KERNELS), help=f"comma list of {', '.join(KERNELS)}")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes")
    args = parser.parse_args(argv)
    try:
        archs = [parse_arch(a) for a in args.arch.split(",") if a.strip()]
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    models = _csv(args.models, MODELS, "model")
    dtypes = _csv(args.dtypes, DTYPES, "dtype")
    kernels = _csv(args.kernels, KERNELS, "kernel")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit(
            "error: TRITON_INTERPRET is set, so triton would interpret the kernels rather than "
            "compile them; run the check without it"
        )

    import triton

    # A fresh cache: a cached kernel is not compiled again, and so would have no ptxas report.
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="compile_check-")
    # The value Triton 3.9 assumes when this is unset (FMA contraction on); setting it only silences its warning.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    start = time.perf_counter()
    records, compiled = run(launches(models, dtypes, kernels), archs, max(1, args.jobs))
    seconds = time.perf_counter() - start

    failed = [r for r in records if not r["ok"]]
    ok = [r for r in records if r["ok"]]
    summary = {
        "triton": triton.__version__,
        "torch": torch.__version__,
        "archs": [arch_label(a) for a in archs],
        "configurations": len(records),
        "distinct_compiles": compiled,
        "failed": len(failed),
        "seconds": round(seconds, 1),
    }
    if ok:
        worst = max(ok, key=lambda r: r["registers"])
        summary["max_registers"] = {k: worst[k] for k in ("registers", "kernel", "model", "dtype", "arch", "num_warps")}
        summary["max_shared_bytes"] = max(r["shared_bytes"] for r in ok)
    print(
        f"triton {triton.__version__}: {len(records)} configurations ({compiled} distinct compiles) for "
        f"{', '.join(summary['archs'])} in {seconds:.1f} s"
    )
    by_kernel: dict[str, list[dict]] = {}
    for r in records:
        by_kernel.setdefault(r["kernel"], []).append(r)
    for name, rows in by_kernel.items():
        good = [r for r in rows if r["ok"]]
        regs = max((r["registers"] for r in good), default=0)
        print(f"  {name:28s} {len(rows):4d} configs  max {regs:3d} registers  {len(rows) - len(good)} failed")
    for r in failed[:20]:
        print(f"FAILED {r['error']}")
    if len(failed) > 20:
        print(f"... and {len(failed) - 20} more failures (see --json)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"summary": summary, "records": records}, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
