"""bench's figures and report: steady tokens/s, MFU, the per-side summary, bench.png and the table.

Throughput is steady-state: input tokens of the steps after bench.warmup_steps divided by their time.
MFU (CUDA only) = tokens/s x FLOPs per token / peak FLOPS, with FLOPs per token = 6N + 12*L*H*Q*T
(PaLM, Chowdhery et al. 2022, appendix B; nanoGPT's estimate_mfu): N the parameters that take part
in matmuls (all but the input embedding table; a tied table counts once, as the output projection),
L layers, H query heads, Q head dim, T sequence length. Recomputation by activation checkpointing is
not counted (model FLOPs, not hardware FLOPs). Peak is NVIDIA's dense datasheet figure for the
device and compute dtype (PEAK_TFLOPS), or bench.peak_tflops.
"""

from __future__ import annotations

import math
from pathlib import Path

from trainer.bench.machine_load import step_spread
from trainer.bench.verdict import relative_differences

# Dense (no sparsity) peak TFLOPS from NVIDIA's H100, H200 and A100 datasheets, by compute dtype:
# "tf32" applies to fp32 matmuls when torch.get_float32_matmul_precision() is not "highest".
# The first entry whose name occurs in torch.cuda.get_device_name() applies (PCIe/NVL before SXM).
PEAK_TFLOPS = (
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H100 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H200 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM5
    ("H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
)


def steady_tokens_per_s(step_seconds: list[float], tokens_per_step: int, warmup_steps: int) -> float:
    steady = step_seconds[warmup_steps:]
    return tokens_per_step * len(steady) / sum(steady)


def flops_per_token(model: dict, seq_len: int) -> int:
    """6N + 12*L*H*Q*T; see the module docstring."""
    input_embedding = 0 if model["tie_embeddings"] else model["vocab_size"] * model["hidden_size"]
    n = model["n_params"] - input_embedding
    return 6 * n + 12 * model["n_layers"] * model["n_heads"] * model["head_dim"] * seq_len


def peak_flops(result: dict, override_tflops: float) -> tuple[float | None, str]:
    """(peak FLOPS per device, where the figure comes from) for a CUDA side; (None, why) if unknown."""
    if override_tflops > 0:
        return override_tflops * 1e12, "bench.peak_tflops"
    dtype = result["dtype"] if result["dtype"] != "fp32" or result["float32_matmul_precision"] == "highest" else "tf32"
    for name, peaks in PEAK_TFLOPS:
        if name in result["device"]:
            return peaks[dtype] * 1e12, f"NVIDIA datasheet, {name} dense {dtype}"
    return None, f"no datasheet figure for {result['device']!r}; pass --bench.peak_tflops"


def side_summary(result: dict, warmup_steps: int, peak_tflops: float) -> dict:
    summary = {
        "losses": result["losses"],
        "tokens_per_s": steady_tokens_per_s(result["step_seconds"], result["tokens_per_step"], warmup_steps),
        "peak_mem_bytes": result["peak_mem_bytes"],
        "dtype": result["dtype"],
        "step_seconds": result["step_seconds"],
        # How far the machine was from quiet while this side ran (trainer/bench/machine_load.py).
        "other_cpu_share": result.get("other_cpu_share"),
        "step_time_spread": step_spread(result["step_seconds"][warmup_steps:]),
    }
    if result["device_type"] == "cuda":
        peak, source = peak_flops(result, peak_tflops)
        fpt = flops_per_token(result["model"], result["seq_len"])
        summary["mfu"] = summary["tokens_per_s"] * fpt / peak if peak else None
        summary["peak_flops"], summary["peak_flops_source"] = peak, source
    for key in ("profile_trace", "transformers", "liger_kernel"):
        if result.get(key):
            summary[key] = result[key]
    return summary


def json_safe(value):
    # JSON has no inf or NaN: a non-finite figure is written as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_plot(report: dict, path: Path) -> Path | None:
    """Loss curves of every side and, under them, each side's relative difference to the reference."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    sides = [s for s in ("reference", "optimized", "peer") if s in report]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, height_ratios=(2, 1))
    for side in sides:
        losses = report[side]["losses"]
        label = report["peer"]["name"] if side == "peer" else side
        top.plot(
            range(1, len(losses) + 1),
            [math.nan if v is None else v for v in losses],
            label=label,
            linestyle="--" if side == "optimized" else "-",
        )
    top.set_ylabel("training loss")
    top.legend()
    top.grid(alpha=0.3)
    if "reference" in report:
        for side in sides[1:]:
            diffs = relative_differences(report[side]["losses"], report["reference"]["losses"])
            bottom.plot(
                range(1, len(diffs) + 1),
                [d if math.isfinite(d) else math.nan for d in diffs],
                label=f"{report['peer']['name'] if side == 'peer' else side} vs reference",
            )
        if report.get("tolerance"):
            bottom.axhline(report["tolerance"], color="tab:red", linewidth=1, linestyle=":", label="tolerance")
        # Differences span orders of magnitude and are often exactly 0: symmetric log shows both.
        bottom.set_yscale("symlog", linthresh=1e-9)
        bottom.set_ylim(bottom=0)
        bottom.set_ylabel("relative difference")
        bottom.legend()
    else:
        bottom.text(
            0.5, 0.5, "no reference (bench.reference=none)", ha="center", va="center", transform=bottom.transAxes
        )
    bottom.set_xlabel("optimizer step")
    bottom.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def format_report(report: dict) -> str:
    sides = [s for s in ("reference", "optimized", "peer") if s in report]
    names = {"reference": "reference", "optimized": "optimized", "peer": report.get("peer", {}).get("name", "")}
    rows = [
        ("", [names[s] for s in sides]),
        ("tokens/s", [f"{report[s]['tokens_per_s']:,.0f}" for s in sides]),
        ("peak memory", [_mib(report[s]["peak_mem_bytes"]) for s in sides]),
        ("compute dtype", [report[s]["dtype"] for s in sides]),
    ]
    if "mfu" in report["optimized"]:
        rows.append(("MFU", [f"{report[s]['mfu']:.1%}" if report[s].get("mfu") else "n/a" for s in sides]))
    rows.append(
        (
            "final loss",
            [f"{report[s]['losses'][-1]:.5f}" if report[s]["losses"][-1] is not None else "nan" for s in sides],
        )
    )
    rows.append(("other CPU load", [_share(report[s].get("other_cpu_share")) for s in sides]))
    rows.append(("step time spread", [_share(report[s].get("step_time_spread")) for s in sides]))
    width = max(len(r[0]) for r in rows) + 2
    lines = [
        f"bench on {report['env']['device']}: {report['steps']} steps of {report['tokens_per_step']:,} tokens; "
        f"tokens/s over steps {report['warmup_steps'] + 1}-{report['steps']}"
    ]
    lines += [label.ljust(width) + "".join(v.rjust(14) for v in values) for label, values in rows]
    if "speedup" in report:
        lines.append(
            f"optimized vs reference: {report['speedup']:.2f}x tokens/s, {report['memory_ratio']:.2f}x peak memory"
        )
    if "peer" in report:
        peer = report["peer"]
        lines.append(
            f"optimized vs {peer['name']}: {peer['optimized_speedup']:.2f}x tokens/s, "
            f"{peer['optimized_memory_ratio']:.2f}x peak memory; {peer['name']} loss max relative difference "
            f"{peer['max_rel_loss_diff']:.1e} vs {peer['compared_with']} (reported, not judged)"
        )
    if not report.get("speed_trusted", True):
        lines.append(
            "warning: the tokens/s ratios above are not a quiet machine's figures: "
            + "; ".join(report["speed_caveats"])
            + "; rerun bench with nothing else running"
        )
    if report["passed"] is None:
        lines.append(report["criterion"])
    else:
        lines.append(
            f"loss: {'PASSED' if report['passed'] else 'FAILED'}: {report['judged_value']:.2e} "
            f"(max per step {report['max_rel_loss_diff']:.2e}) against a tolerance of "
            f"{report['tolerance']:.0e}; criterion: {report['criterion']}"
        )
    lines.append("written: " + ", ".join(report["files"]))
    return "\n".join(lines)
