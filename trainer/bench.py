"""`python -m trainer bench`: the configured run against its eager PyTorch reference, side by side.

One model initialisation and one data order (the same seed and the same sampler on every side) are
trained twice, each side in a process of its own (trainer/bench_worker.py) so that its peak memory
is its own:

- reference: the same model with every op on its plain PyTorch reference (materialised logits and
  F.cross_entropy), fp32 compute and parameters, no torch.compile, no activation checkpointing,
  AdamW with fp32 states;
- optimized: the configured run (kernels, compile, checkpointing, optimizer, dtype).

`--bench.peer=hf` adds a third side: Hugging Face transformers.Trainer with LlamaForCausalLM on the
same initial weights and batches, with AdamW and the same LR schedule, in the configured dtype
(`hf-liger`: with use_liger_kernel, CUDA only). A Hugging Face model shifts labels itself and scores
seq_len-1 predictions per block; when a peer runs, every side ignores the last label of each block
so all of them score exactly the same predictions.

The verdict depends on what the optimized run changes (bench.tolerance=0, the default):
- nothing that should move the loss in fp32 (kernels, compile, checkpointing): every step's loss
  within EXACT_TOLERANCE = 1e-4 relative of the reference;
- bf16/fp16 compute, bf16 parameters, 8-bit optimizer states, GaLore or Adafactor: such runs follow a different
  trajectory step by step, so the criterion is over the curve: the mean relative difference over the
  last half of the steps within the largest LOOSE_TOLERANCES entry that applies.
A positive bench.tolerance replaces the number and keeps the criterion. Relative difference of a
step: |optimized - reference| / |reference|. The peer's losses are reported, not judged: it is a
different implementation of the same model.

Throughput is steady-state: input tokens of the steps after bench.warmup_steps divided by their time.
MFU (CUDA only) = tokens/s x FLOPs per token / peak FLOPS, with FLOPs per token = 6N + 12*L*H*Q*T
(PaLM, Chowdhery et al. 2022, appendix B; nanoGPT's estimate_mfu): N the parameters that take part
in matmuls (all but the input embedding table; a tied table counts once, as the output projection),
L layers, H query heads, Q head dim, T sequence length. Recomputation by activation checkpointing is
not counted (model FLOPs, not hardware FLOPs). Peak is NVIDIA's dense datasheet figure for the
device and compute dtype (PEAK_TFLOPS), or bench.peak_tflops.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import math
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from trainer.config import TrainConfig, to_toml
from trainer.errors import ConfigError, TrainerError

EXACT_TOLERANCE = 1e-4
# Mean relative loss difference over the last half of the steps, by what the optimized run changes.
LOOSE_TOLERANCES = {
    "bf16 compute": 2e-2,
    "fp16 compute": 2e-2,
    "bf16 parameters": 3e-2,
    "8-bit optimizer states": 3e-2,
    "GaLore low-rank gradient projection": 5e-2,
    "Adafactor instead of AdamW": 1e-1,  # a different optimizer: only the curve's level is comparable
}
# Keys that trainer/parallel may define: the reference turns them off when they exist.
REFERENCE_OFF_KEYS = ("parallel.compile", "parallel.activation_checkpointing")

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


class BenchError(TrainerError):
    pass


# ---------------------------------------------------------------- the sides' configs

def reference_config(cfg: TrainConfig) -> TrainConfig:
    """The eager reference of `cfg`: same model, data, seed and schedule, every speed-up off."""
    ref = copy.deepcopy(cfg)
    ref.kernels.enabled = False
    ref.train.dtype = "fp32"
    ref.train.param_dtype = "fp32"
    ref.optim.name = "adamw"
    for key in REFERENCE_OFF_KEYS:
        section_name, name = key.split(".")
        section = getattr(ref, section_name, None)
        if section is not None and hasattr(section, name):
            setattr(section, name, False if isinstance(getattr(section, name), bool) else "none")
    return ref


def loss_changes(cfg: TrainConfig, compute_dtype: str) -> list[str]:
    """What in the optimized run changes the loss beyond fp32 rounding (the keys of LOOSE_TOLERANCES)."""
    changes = []
    if compute_dtype in ("bf16", "fp16"):
        changes.append(f"{compute_dtype} compute")
    if cfg.train.param_dtype == "bf16":
        changes.append("bf16 parameters")
    name = cfg.optim.name.lower()
    if "8bit" in name:
        changes.append("8-bit optimizer states")
    if "galore" in name:
        changes.append("GaLore low-rank gradient projection")
    if "adafactor" in name:
        changes.append("Adafactor instead of AdamW")
    return changes


def check_bench_config(cfg: TrainConfig, device_type: str) -> None:
    b, t = cfg.bench, cfg.train
    if b.warmup_steps >= t.max_steps:
        raise ConfigError(f"bench.warmup_steps={b.warmup_steps} leaves no steady steps out of train.max_steps="
                          f"{t.max_steps}; lower bench.warmup_steps or raise train.max_steps")
    strategy = getattr(getattr(cfg, "parallel", None), "strategy", "none")
    if strategy != "none":
        raise ConfigError(f"bench runs each side in one process; parallel.strategy={strategy} is not supported")
    if b.peer != "none":
        if cfg.data.document_mask:
            raise ConfigError("bench.peer needs data.document_mask=false: the Hugging Face peer takes plain blocks")
        if importlib.util.find_spec("transformers") is None:
            raise ConfigError(f"bench.peer={b.peer} needs transformers (pip install 'transformers>=5')")
        version = importlib.metadata.version("transformers")
        if int(version.split(".")[0]) < 5:  # the peer uses TrainingArguments.train_sampling_strategy
            raise ConfigError(f"bench.peer={b.peer} needs transformers>=5, found {version}")
    if b.peer == "hf-liger":
        if device_type != "cuda":
            raise ConfigError("bench.peer=hf-liger needs a CUDA GPU (Liger's kernels are Triton kernels); "
                              "use bench.peer=hf on CPU")
        if importlib.util.find_spec("liger_kernel") is None:
            raise ConfigError("bench.peer=hf-liger needs liger-kernel (pip install liger-kernel)")


# ---------------------------------------------------------------- figures

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


def relative_differences(losses: list, reference: list) -> list[float]:
    """|loss - reference| / |reference| per step; inf where either is missing or non-finite."""
    out = []
    for value, ref in zip(losses, reference):
        finite = value is not None and ref is not None and math.isfinite(value) and math.isfinite(ref) and ref != 0
        out.append(abs(value - ref) / abs(ref) if finite else math.inf)
    return out


def judge(optimized: list, reference: list, changes: list[str], tolerance: float) -> dict:
    diffs = relative_differences(optimized, reference)
    n = len(diffs)
    if not changes:
        tol = tolerance or EXACT_TOLERANCE
        value, passed = max(diffs), max(diffs) <= tol
        criterion = (f"every step's loss within {tol:.0e} relative of the eager reference (max over the {n} steps "
                     "of |optimized - reference| / |reference|): in fp32 the optimized ops compute the same "
                     "function, so only rounding may differ")
    else:
        tol = tolerance or max(LOOSE_TOLERANCES[c] for c in changes)
        tail = diffs[n // 2:]
        value = sum(tail) / len(tail)
        passed = value <= tol
        criterion = (f"mean relative loss difference over the last half of the steps ({n // 2 + 1}-{n}) within "
                     f"{tol:.0e} of the eager reference, because the optimized run uses {', '.join(changes)}: "
                     "step-by-step differences are expected, the curve must match")
    return {"max_rel_loss_diff": max(diffs), "mean_rel_loss_diff_last_half": sum(diffs[n // 2:]) / len(diffs[n // 2:]),
            "judged_value": value, "tolerance": tol, "criterion": criterion, "passed": passed,
            "rel_loss_diffs": diffs}


def side_summary(result: dict, warmup_steps: int, peak_tflops: float) -> dict:
    summary = {"losses": result["losses"],
               "tokens_per_s": steady_tokens_per_s(result["step_seconds"], result["tokens_per_step"], warmup_steps),
               "peak_mem_bytes": result["peak_mem_bytes"], "dtype": result["dtype"],
               "step_seconds": result["step_seconds"]}
    if result["device_type"] == "cuda":
        peak, source = peak_flops(result, peak_tflops)
        fpt = flops_per_token(result["model"], result["seq_len"])
        summary["mfu"] = summary["tokens_per_s"] * fpt / peak if peak else None
        summary["peak_flops"], summary["peak_flops_source"] = peak, source
    for key in ("profile_trace", "transformers", "liger_kernel"):
        if result.get(key):
            summary[key] = result[key]
    return summary


# ---------------------------------------------------------------- running the sides

def run_side(side: str, cfg: TrainConfig, out: Path, *, mask_last_label: bool, profile: bool) -> dict:
    side_dir = out / side
    side_dir.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(cfg)
    cfg.train.output_dir = str(side_dir)
    cfg.checkpoint.resume_from = ""  # bench always starts fresh
    config_file, spec_file, result_file = (side_dir / name for name in
                                           ("bench_config.toml", "bench_spec.json", "bench_result.json"))
    config_file.write_text(to_toml(cfg))
    result_file.unlink(missing_ok=True)
    spec = {"side": side, "config": str(config_file), "result": str(result_file), "mask_last_label": mask_last_label,
            "warmup_steps": cfg.bench.warmup_steps, "peer": cfg.bench.peer,
            "profile_trace": str(out / f"trace-{side}.json") if profile else None}
    spec_file.write_text(json.dumps(spec, indent=2))
    sys.stdout.flush()
    proc = subprocess.run([sys.executable, "-m", "trainer.bench_worker", str(spec_file)])
    result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    if proc.returncode == 0 and "losses" in result:
        return result
    if proc.returncode < 0 or proc.returncode == 130:
        raise KeyboardInterrupt
    if "error" in result:
        raise BenchError(f"{side} run: {result['error']}")
    raise BenchError(f"the {side} run failed (exit code {proc.returncode}); its output is above")


def run_bench(cfg: TrainConfig) -> dict:
    """Runs the sides, writes bench.json and bench.png; returns the report."""
    from trainer.loop import resolve_device

    cfg = cfg.validate()
    b = cfg.bench
    check_bench_config(cfg, resolve_device(cfg.train.device).type)
    out = Path(cfg.train.output_dir or Path("runs") / datetime.now().strftime("bench-%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("bench.json", "bench.png", "trace-optimized.json"):
        (out / stale).unlink(missing_ok=True)
    mask = b.peer != "none"

    results = {}
    if b.reference == "eager":
        print(f"bench: eager reference run -> {out / 'reference'}")
        results["reference"] = run_side("reference", reference_config(cfg), out, mask_last_label=mask, profile=False)
    print(f"bench: optimized run -> {out / 'optimized'}")
    results["optimized"] = run_side("optimized", cfg, out, mask_last_label=mask, profile=b.profile)
    if b.peer != "none":
        print(f"bench: {b.peer} peer (transformers.Trainer) run -> {out / 'peer'}")
        results["peer"] = run_side("peer", cfg, out, mask_last_label=mask, profile=False)

    checksums = {side: r["initial_checksum"] for side, r in results.items()}
    if len({tuple(c) for c in checksums.values()}) != 1:
        raise BenchError(f"the sides did not start from the same weights (checksums {checksums}); bench cannot compare")

    opt = results["optimized"]
    report = {side: side_summary(r, b.warmup_steps, b.peak_tflops) for side, r in results.items()}
    report.update({
        "steps": cfg.train.max_steps, "warmup_steps": b.warmup_steps, "tokens_per_step": opt["tokens_per_step"],
        "last_label_ignored": mask, "flops_per_token": flops_per_token(opt["model"], opt["seq_len"]),
        "flops_per_token_formula": "6N + 12*L*H*Q*T (PaLM appendix B; N = matmul parameters)",
        "model": opt["model"], "config": cfg.to_dict(),
        "env": {"device": opt["device"], "torch": opt["torch"], "triton": opt["triton"]},
    })
    if "reference" in results:
        changes = loss_changes(cfg, opt["dtype"])
        verdict = judge(opt["losses"], results["reference"]["losses"], changes, b.tolerance)
        report.update(verdict)
        report["loss_changes"] = changes
        report["speedup"] = report["optimized"]["tokens_per_s"] / report["reference"]["tokens_per_s"]
        report["memory_ratio"] = report["optimized"]["peak_mem_bytes"] / report["reference"]["peak_mem_bytes"]
    else:
        report.update({"max_rel_loss_diff": None, "tolerance": None, "passed": None,
                       "criterion": "no eager reference ran (bench.reference=none): the optimized figures stand "
                                    "alone and the losses were not checked"})
    if "peer" in results:
        peer = report.pop("peer")
        base = "reference" if "reference" in results else "optimized"
        peer.update({"name": b.peer, "compared_with": base,
                     "max_rel_loss_diff": max(relative_differences(peer["losses"], report[base]["losses"])),
                     "optimized_speedup": report["optimized"]["tokens_per_s"] / peer["tokens_per_s"],
                     "optimized_memory_ratio": report["optimized"]["peak_mem_bytes"] / peer["peak_mem_bytes"]})
        report["peer"] = peer
        report["env"]["transformers"] = peer.get("transformers")
    (out / "bench.json").write_text(json.dumps(_json_safe(report), indent=2) + "\n")
    plot = write_plot(report, out / "bench.png")
    report["files"] = [str(out / "bench.json")] + ([str(plot)] if plot else []) + \
        [report[s]["profile_trace"] for s in ("optimized",) if report[s].get("profile_trace")]
    return report


def _json_safe(value):
    # JSON has no inf or NaN: a non-finite figure is written as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# ---------------------------------------------------------------- report

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
        top.plot(range(1, len(losses) + 1), [math.nan if v is None else v for v in losses], label=label,
                 linestyle="--" if side == "optimized" else "-")
    top.set_ylabel("training loss")
    top.legend()
    top.grid(alpha=0.3)
    if "reference" in report:
        for side in sides[1:]:
            diffs = relative_differences(report[side]["losses"], report["reference"]["losses"])
            bottom.plot(range(1, len(diffs) + 1), [d if math.isfinite(d) else math.nan for d in diffs],
                        label=f"{report['peer']['name'] if side == 'peer' else side} vs reference")
        if report.get("tolerance"):
            bottom.axhline(report["tolerance"], color="tab:red", linewidth=1, linestyle=":", label="tolerance")
        # Differences span orders of magnitude and are often exactly 0: symmetric log shows both.
        bottom.set_yscale("symlog", linthresh=1e-9)
        bottom.set_ylim(bottom=0)
        bottom.set_ylabel("relative difference")
        bottom.legend()
    else:
        bottom.text(0.5, 0.5, "no reference (bench.reference=none)", ha="center", va="center",
                    transform=bottom.transAxes)
    bottom.set_xlabel("optimizer step")
    bottom.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def format_report(report: dict) -> str:
    sides = [s for s in ("reference", "optimized", "peer") if s in report]
    names = {"reference": "reference", "optimized": "optimized", "peer": report.get("peer", {}).get("name", "")}
    rows = [("", [names[s] for s in sides]),
            ("tokens/s", [f"{report[s]['tokens_per_s']:,.0f}" for s in sides]),
            ("peak memory", [_mib(report[s]["peak_mem_bytes"]) for s in sides]),
            ("compute dtype", [report[s]["dtype"] for s in sides])]
    if "mfu" in report["optimized"]:
        rows.append(("MFU", [f"{report[s]['mfu']:.1%}" if report[s].get("mfu") else "n/a" for s in sides]))
    rows.append(("final loss", [f"{report[s]['losses'][-1]:.5f}" if report[s]["losses"][-1] is not None else "nan"
                                for s in sides]))
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"bench on {report['env']['device']}: {report['steps']} steps of {report['tokens_per_step']:,} tokens; "
             f"tokens/s over steps {report['warmup_steps'] + 1}-{report['steps']}"]
    lines += [label.ljust(width) + "".join(v.rjust(14) for v in values) for label, values in rows]
    if "speedup" in report:
        lines.append(f"optimized vs reference: {report['speedup']:.2f}x tokens/s, {report['memory_ratio']:.2f}x "
                     "peak memory")
    if "peer" in report:
        peer = report["peer"]
        lines.append(f"optimized vs {peer['name']}: {peer['optimized_speedup']:.2f}x tokens/s, "
                     f"{peer['optimized_memory_ratio']:.2f}x peak memory; {peer['name']} loss max relative difference "
                     f"{peer['max_rel_loss_diff']:.1e} vs {peer['compared_with']} (reported, not judged)")
    if report["passed"] is None:
        lines.append(report["criterion"])
    else:
        lines.append(f"loss: {'PASSED' if report['passed'] else 'FAILED'}: {report['judged_value']:.2e} "
                     f"(max per step {report['max_rel_loss_diff']:.2e}) against a tolerance of {report['tolerance']:.0e}; "
                     f"criterion: {report['criterion']}")
    lines.append("written: " + ", ".join(report["files"]))
    return "\n".join(lines)
