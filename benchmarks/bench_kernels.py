"""Kernel benchmarks (pytest-benchmark). Named bench_*, so `pytest tests/` never collects them.

GPU (skipped with a reason when CUDA is absent or Triton is interpreted): each op's forward +
backward, ours (Triton) against eager PyTorch, torch.compile of that eager code, Liger-Kernel where
installed and, for the fused loss, torch's own chunked `F.linear_cross_entropy` where this torch has
it. Reported per case: time (pytest-benchmark's table), and in extra_info the achieved GB/s (the
bytes the op must read and write once, over the median time), TFLOP/s for the fused loss, and the
peak memory above the inputs.

BENCH_KERNELS_DRY_RUN=1 with TRITON_INTERPRET=1 runs the same cases on CPU at tiny sizes, one
round each and without torch.compile: the plumbing only (benchmarks/gpu_suite.py --dry-run).

CPU: the fused loss's reference path against materialised logits + F.cross_entropy and torch's
own chunked F.linear_cross_entropy (where this torch has it), fp32, at four shapes (CPU_SHAPES:
8192 tokens x hidden 256 x vocab 32768, the default run's loss, a ~100M model's, and the tiny
preset's 512 tokens with a byte-sized vocabulary of 320, whose logits the fused loss computes whole;
there a fourth side forces its chunks): each side in a fresh child process, its time and its extra
peak memory (ru_maxrss), so one side's high-water mark cannot hide another's.

    python -m pytest benchmarks/bench_kernels.py --benchmark-json=benchmarks/results/<device>.json
    python benchmarks/bench_kernels.py [--json PATH]   # just the CPU fused-loss comparison, printed
    python benchmarks/bench_kernels.py --whole-bound   # the fused loss chunked against whole, near 1 MiB
"""

import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import trainer.ops as ops  # noqa: E402
import trainer.ops.cross_entropy as ce  # noqa: E402
from trainer.bench.machine_load import OTHER_LOAD_LIMIT, OtherLoad  # noqa: E402
from trainer.ops.rms_norm import rms_norm_reference  # noqa: E402
from trainer.ops.rope import rope_reference  # noqa: E402
from trainer.ops.swiglu import gated_activation_reference  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
ON_GPU = torch.cuda.is_available() and not INTERPRETED
DRY_RUN = os.environ.get("BENCH_KERNELS_DRY_RUN") == "1" and not ON_GPU
DEVICE = "cuda" if ON_GPU else "cpu"
needs_gpu = pytest.mark.skipif(
    not ON_GPU and not (DRY_RUN and INTERPRETED),
    reason="GPU kernel benchmarks need CUDA and compiled Triton (TRITON_INTERPRET unset); "
    "BENCH_KERNELS_DRY_RUN=1 with TRITON_INTERPRET=1 runs their plumbing on CPU",
)

try:
    import liger_kernel.transformers.functional as liger
except Exception:  # not installed, or no GPU triton backend
    liger = None

PROVIDERS = ("ours", "ours_reference", "eager", "compile", "liger", "torch")
EPS = 1e-6
# Full sizes: Llama-3-8B's hidden, intermediate, heads and vocabulary at 8192 tokens. Tiny: the dry run.
SIZES = dict(
    tokens=8192, hidden=4096, wide=16384, inter=14336, vocab=128256, batch=4, seq=2048, heads=32, kv=8, dim=128
)
if DRY_RUN:
    SIZES = dict(tokens=64, hidden=96, wide=160, inter=200, vocab=500, batch=1, seq=16, heads=4, kv=2, dim=16)


@dataclass
class Case:
    inputs: dict  # tensors; those with requires_grad get gradients
    bytes: int  # bytes the forward + backward must move, each tensor read/written once
    providers: dict  # name -> forward function of **inputs, returning a tensor or tuple
    flops: int = 0


def _rand(*shape, dtype=torch.bfloat16, grad=True, scale=1.0):
    return (scale * torch.randn(*shape, device=DEVICE, dtype=dtype)).requires_grad_(grad)


def _compiled(fn):
    # The dry run leaves torch.compile out: on CPU it alone would take minutes.
    return None if DRY_RUN else torch.compile(fn, fullgraph=True)


def _providers(**fns):
    return {name: fn for name, fn in fns.items() if fn is not None}


def case_rms_norm(tokens=SIZES["tokens"], hidden=SIZES["hidden"], dtype=torch.bfloat16):
    e = torch.finfo(dtype).bits // 8
    inputs = dict(x=_rand(tokens, hidden, dtype=dtype), weight=_rand(hidden, dtype=dtype))
    eager = lambda x, weight: rms_norm_reference(x, weight, EPS)  # noqa: E731
    providers = _providers(
        ours=lambda x, weight: ops.rms_norm(x, weight, EPS, force="triton"), eager=eager, compile=_compiled(eager)
    )
    if liger is not None:
        providers["liger"] = lambda x, weight: liger.liger_rms_norm(x, weight, EPS)
    # forward: read x, write y; backward: read dy, x, write dx (weight-sized traffic ignored)
    return Case(inputs, 5 * tokens * hidden * e, providers)


def case_add_rms_norm(tokens=SIZES["tokens"], hidden=SIZES["hidden"], dtype=torch.bfloat16):
    e = torch.finfo(dtype).bits // 8
    inputs = dict(
        x=_rand(tokens, hidden, dtype=dtype),
        residual=_rand(tokens, hidden, dtype=dtype),
        weight=_rand(hidden, dtype=dtype),
    )

    def eager(x, residual, weight):
        total = x + residual
        return total, rms_norm_reference(total, weight, EPS)

    providers = _providers(
        ours=lambda x, residual, weight: ops.add_rms_norm(x, residual, weight, EPS, force="triton"),
        eager=eager,
        compile=_compiled(eager),
    )
    if liger is not None:
        providers["liger"] = lambda x, residual, weight: liger.liger_fused_add_rms_norm(x, residual, weight, EPS)
    # forward: read x, residual, write sum, y; backward: read dy, d_sum, sum, write one gradient
    return Case(inputs, 8 * tokens * hidden * e, providers)


def case_rope(
    batch=SIZES["batch"],
    q_heads=SIZES["heads"],
    k_heads=SIZES["kv"],
    seq=SIZES["seq"],
    dim=SIZES["dim"],
    dtype=torch.bfloat16,
):
    e = torch.finfo(dtype).bits // 8
    angles = torch.arange(seq, device=DEVICE)[:, None] * (1.0 / 10000 ** (torch.arange(0, dim, 2, device=DEVICE) / dim))
    emb = torch.cat((angles, angles), -1)
    inputs = dict(
        q=_rand(batch, q_heads, seq, dim, dtype=dtype),
        k=_rand(batch, k_heads, seq, dim, dtype=dtype),
        cos=emb.cos().to(dtype),
        sin=emb.sin().to(dtype),
    )
    providers = _providers(
        ours=lambda q, k, cos, sin: ops.rope(q, k, cos, sin, force="triton"),
        eager=rope_reference,
        compile=_compiled(rope_reference),
    )
    if liger is not None:
        providers["liger"] = lambda q, k, cos, sin: liger.liger_rope(q, k, cos[None], sin[None])
    # forward: read q, k, write both; backward the same again
    return Case(inputs, 4 * batch * (q_heads + k_heads) * seq * dim * e, providers)


def case_gated(tokens=SIZES["tokens"], inter=SIZES["inter"], dtype=torch.bfloat16, activation="silu"):
    """SwiGLU (silu) or GeGLU (gelu_tanh, Gemma's), at the same shape so the two compare directly."""
    e = torch.finfo(dtype).bits // 8
    inputs = dict(gate=_rand(tokens, inter, dtype=dtype), up=_rand(tokens, inter, dtype=dtype))
    eager = lambda gate, up: gated_activation_reference(gate, up, activation)  # noqa: E731
    providers = _providers(
        ours=lambda gate, up: ops.gated_activation(gate, up, activation, force="triton"),
        eager=eager,
        compile=_compiled(eager),
    )
    if liger is not None:
        providers["liger"] = liger.liger_swiglu if activation == "silu" else liger.liger_geglu
    # forward: read gate, up, write out; backward: read d_out, gate, up, write d_gate, d_up
    return Case(inputs, 8 * tokens * inter * e, providers)


def _materialised_loss(hidden, weight, labels):
    return F.cross_entropy((hidden @ weight.t()).float(), labels)


def case_fused_linear_cross_entropy(
    tokens=SIZES["tokens"], hidden=SIZES["hidden"], vocab=SIZES["vocab"], dtype=torch.bfloat16
):
    e = torch.finfo(dtype).bits // 8
    inputs = dict(
        hidden=_rand(tokens, hidden, dtype=dtype),
        weight=_rand(vocab, hidden, dtype=dtype, scale=0.02),
        labels=torch.randint(0, vocab, (tokens,), device=DEVICE),
    )

    def ours(hidden, weight, labels):
        return ops.linear_cross_entropy(hidden, weight, labels, force="triton")

    def ours_reference(hidden, weight, labels):  # the chunked PyTorch path, on the GPU
        return ops.linear_cross_entropy(hidden, weight, labels, force="reference")

    providers = _providers(
        ours=ours, ours_reference=ours_reference, eager=_materialised_loss, compile=_compiled(_materialised_loss)
    )
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        # torch's own chunked fused loss (options=None would be its materialising reference path).
        providers["torch"] = lambda hidden, weight, labels: F.linear_cross_entropy(
            hidden, weight, labels, options=torch.nn.LinearCrossEntropyOptions()
        )
    if liger is not None:
        providers["liger"] = lambda hidden, weight, labels: liger.liger_fused_linear_cross_entropy(
            hidden, weight, labels
        )
    # read hidden and weight, write their gradients; the logits are never supposed to reach memory
    return Case(inputs, 2 * (tokens + vocab) * hidden * e, providers, flops=6 * tokens * hidden * vocab)


CASES: dict[str, Callable[[], Case]] = {
    "rms_norm": case_rms_norm,
    "rms_norm_wide": lambda: case_rms_norm(tokens=SIZES["tokens"] // 2, hidden=SIZES["wide"]),
    "add_rms_norm": case_add_rms_norm,
    "rope": case_rope,
    "swiglu": case_gated,
    "geglu": lambda: case_gated(activation="gelu_tanh"),
    "fused_linear_cross_entropy": case_fused_linear_cross_entropy,
}


def _forward_backward(fn, inputs):
    outs = fn(**inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    leaves = [t for t in inputs.values() if t.requires_grad]
    # autograd.grad rather than backward(): nothing accumulates into .grad between rounds. Ones are
    # as good an upstream gradient as any for timing.
    torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs])


def _step(fn, inputs):
    def step():
        _forward_backward(fn, inputs)
        if ON_GPU:
            torch.cuda.synchronize()

    return step


def _extra_peak_bytes(step) -> int | None:
    if not ON_GPU:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    return torch.cuda.max_memory_allocated() - base


@needs_gpu
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case_name", list(CASES))
def test_gpu_kernel(benchmark, case_name, provider):
    case = CASES[case_name]()
    if provider not in case.providers:
        pytest.skip(f"{provider} has no {case_name} (not installed, not in a dry run, or not a provider of this case)")
    step = _step(case.providers[provider], case.inputs)
    for _ in range(1 if DRY_RUN else 2):  # compile / autotune outside the measurement
        step()
    peak = _extra_peak_bytes(step)
    benchmark.group = case_name
    benchmark.pedantic(step, rounds=1 if DRY_RUN else 20, warmup_rounds=0 if DRY_RUN else 2, iterations=1)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if ON_GPU else "cpu (dry run)",
        provider=provider,
        bytes=case.bytes,
        gb_per_s=round(case.bytes / seconds / 1e9, 1),
        extra_peak_mib=None if peak is None else round(peak / 2**20, 1),
    )
    if case.flops:
        benchmark.extra_info["tflop_per_s"] = round(case.flops / seconds / 1e12, 1)


# ---- CPU: the fused loss's reference path against materialised logits and torch's own ----

# (tokens, hidden, vocab): the wide-vocabulary case, the default run's loss (small preset, 8 x 256
# tokens, the 4096-token BPE), a ~100M model's (hidden 768, a 16384-token BPE, 4 x 512 tokens) and
# the tiny preset's 8 x 64 tokens with a byte-sized vocabulary (logits computed whole).
CPU_SHAPES = ((8192, 256, 32768), (2048, 256, 4096), (2048, 768, 16384), (512, 128, 320))
TORCH_HAS_LCE = hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")
CPU_SIDES = ("fused_reference", "materialised") + (("torch_chunked",) if TORCH_HAS_LCE else ())


def cpu_sides(shape: tuple[int, int, int]) -> tuple[str, ...]:
    """The sides compared at `shape`: with "fused_chunked" (the fused loss made to chunk) where the
    fused loss would compute these logits whole."""
    tokens, _, vocab = shape
    whole = ce.materializes_logits(tokens, vocab, 4, triton=False)
    return CPU_SIDES + (("fused_chunked",) if whole else ())


def cpu_repeats(shape: tuple[int, int, int]) -> int:
    """Timed calls per side: a millisecond-long call needs many for a stable median."""
    tokens, hidden, vocab = shape
    return 5 if tokens * hidden * vocab > 2**26 else 101


def _cpu_inputs(shape=CPU_SHAPES[0]):
    tokens, hidden_size, vocab = shape
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=g).requires_grad_()
    weight = (0.02 * torch.randn(vocab, hidden_size, generator=g)).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    return hidden, weight, labels


def _cpu_loss(side, hidden, weight, labels):
    if side == "fused_reference":
        return ops.linear_cross_entropy(hidden, weight, labels, force="reference")
    if side == "fused_chunked":  # what the fused loss did before it computed small logits whole
        with _whole_logits_up_to(0):
            return ops.linear_cross_entropy(hidden, weight, labels, force="reference")
    if side == "torch_chunked":  # torch's own chunked loss (options=None would materialise)
        return F.linear_cross_entropy(hidden, weight, labels, options=torch.nn.LinearCrossEntropyOptions())
    return _materialised_loss(hidden, weight, labels)


@contextlib.contextmanager
def _whole_logits_up_to(nbytes: int):
    """The fused loss computes logits of at most `nbytes` whole (0: it always chunks)."""
    bound = ce.MAX_MATERIALIZED_LOGIT_BYTES
    ce.MAX_MATERIALIZED_LOGIT_BYTES = nbytes
    try:
        yield
    finally:
        ce.MAX_MATERIALIZED_LOGIT_BYTES = bound


def _cpu_step(side, hidden, weight, labels):
    loss = _cpu_loss(side, hidden, weight, labels)
    torch.autograd.grad(loss, (hidden, weight))
    return loss


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _child(side: str, shape: tuple[int, int, int], repeats: int) -> dict:
    """Runs in a fresh process: the extra high-water mark of forward + backward, and its times."""
    # What a path imports on its first call is not the loss's memory: torch.library's custom-op
    # machinery alone pulls in ~900 modules (sympy among them), ~150 MiB of RSS. One call on a few
    # tokens, chunks forced, does it before the base is read.
    with _whole_logits_up_to(0):
        _cpu_step(side, *_cpu_inputs((4, shape[1], 16)))
    hidden, weight, labels = _cpu_inputs(shape)
    base = _maxrss_bytes()
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = _cpu_step(side, hidden, weight, labels)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return dict(
        side=side,
        shape=list(shape),
        loss=float(loss),
        extra_peak_bytes=_maxrss_bytes() - base,
        seconds=times,
        cpu_seconds=cpu_times,
        threads=torch.get_num_threads(),
    )


def run_cpu_side(side: str, shape: tuple[int, int, int] = CPU_SHAPES[0], repeats: int = 1) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    load = OtherLoad()
    out = subprocess.run(
        [sys.executable, __file__, "--child", side, ",".join(map(str, shape)), str(repeats)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    # Other processes' share of the machine's CPU time while this side ran (None off Linux)
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "other_cpu_share": load.share()}


@pytest.mark.parametrize("side", CPU_SIDES)
def test_cpu_fused_loss(benchmark, side):
    memory = run_cpu_side(side)
    inputs = _cpu_inputs()
    tokens, hidden_size, vocab = CPU_SHAPES[0]
    benchmark.group = "cpu_fused_linear_cross_entropy"
    benchmark.pedantic(_cpu_step, args=(side, *inputs), rounds=3, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update(
        side=side,
        tokens=tokens,
        hidden=hidden_size,
        vocab=vocab,
        dtype="fp32",
        extra_peak_mib=round(memory["extra_peak_bytes"] / 2**20, 1),
        loss=memory["loss"],
    )


def _median(values):
    return sorted(values)[len(values) // 2]


def cpu_comparison(repeats: int = 5) -> list[dict]:
    """Every shape, every side in its own fresh process, one after another: the first call of each
    process is its warm-up, left out of the median."""
    results = []
    for shape in CPU_SHAPES:
        for side in cpu_sides(shape):
            r = run_cpu_side(side, shape, repeats=max(repeats, cpu_repeats(shape)) + 1)
            r["median_seconds"] = _median(r["seconds"][1:])
            results.append(r)
    return results


# Around MAX_MATERIALIZED_LOGIT_BYTES (1 MiB of fp32 logits): 0.6 to 8 MiB, and a few tokens (the
# fixed cost of a call)
BOUND_SHAPES = (
    (8, 16, 32),
    (512, 128, 320),
    (1024, 128, 320),
    (512, 128, 1024),
    (2048, 128, 320),
    (1024, 128, 1024),
    (512, 128, 4096),
)


def whole_bound(repeats: int = 150) -> list[dict]:
    """The fused loss made to chunk against made to compute the logits whole, and plain logits +
    F.cross_entropy, in one process, alternating call by call (the order reversed every call),
    medians after one warm-up call each: where chunked / whole crosses 1 is where
    MAX_MATERIALIZED_LOGIT_BYTES belongs."""
    results = []
    for shape in BOUND_SHAPES:
        inputs = _cpu_inputs(shape)
        times = {"chunked": [], "whole": [], "materialised": []}
        ways = [
            ("chunked", "fused_reference", 0),
            ("whole", "fused_reference", 1 << 62),
            ("materialised", "materialised", 0),
        ]
        for call in range(repeats + 1):
            for way, side, bound in ways if call % 2 else ways[::-1]:
                with _whole_logits_up_to(bound):
                    start = time.perf_counter()
                    _cpu_step(side, *inputs)
                    if call:
                        times[way].append(time.perf_counter() - start)
        medians = {way: _median(t) for way, t in times.items()}
        results.append(dict(shape=list(shape), logit_mib=shape[0] * shape[2] * 4 / 2**20, median_seconds=medians))
    return results


def main():
    if "--whole-bound" in sys.argv:
        print("CPU fused linear cross-entropy, fp32, forward + backward, chunked against computed whole and")
        print("against plain logits + F.cross_entropy, in one process, alternating; medians of 150")
        for r in whole_bound():
            m = r["median_seconds"]
            print(
                f"{' x '.join(map(str, r['shape']))} ({r['logit_mib']:.2f} MiB of logits): chunked "
                f"{m['chunked'] * 1e3:.2f} ms, whole {m['whole'] * 1e3:.2f} ms, plain logits + F.cross_entropy "
                f"{m['materialised'] * 1e3:.2f} ms; chunked / whole {m['chunked'] / m['whole']:.2f}x"
            )
        return
    if len(sys.argv) >= 3 and sys.argv[1] == "--child":
        torch.set_grad_enabled(True)
        shape = tuple(int(x) for x in sys.argv[3].split(","))
        print(json.dumps(_child(sys.argv[2], shape, int(sys.argv[4]) if len(sys.argv) > 4 else 1)))
        return
    json_path = sys.argv[sys.argv.index("--json") + 1] if "--json" in sys.argv else None
    print("CPU fused linear cross-entropy, fp32, forward + backward, each side in its own process; median of 5")
    print("(101 at the millisecond-long shape) after one warm-up; extra peak = the process's high-water mark")
    print("above its inputs")
    with open("/proc/loadavg") as f:
        print(f"load before: {f.read().strip()}")
    results = cpu_comparison()
    with open("/proc/loadavg") as f:
        print(f"load after: {f.read().strip()}")
    for shape in CPU_SHAPES:
        rows = [r for r in results if tuple(r["shape"]) == shape]
        fused = next(r for r in rows if r["side"] == "fused_reference")
        print(f"{shape[0]} tokens x hidden {shape[1]} x vocab {shape[2]}:")
        for r in rows:
            print(
                f"  {r['side']:16s} loss {r['loss']:.6f}  median {r['median_seconds'] * 1e3:8.1f} ms "
                f"(fused / this {fused['median_seconds'] / r['median_seconds']:.2f}x)  "
                f"extra peak {r['extra_peak_bytes'] / 2**20:6.0f} MiB  ({r['threads']} threads, "
                f"other processes {100 * (r['other_cpu_share'] or 0):.0f}% of the CPUs)"
            )
    busy = [r for r in results if (r["other_cpu_share"] or 0) > OTHER_LOAD_LIMIT]
    if busy:
        print(f"warning: other processes used over {OTHER_LOAD_LIMIT:.0%} of the CPUs during {len(busy)} side(s)")
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
