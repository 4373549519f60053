"""`python -m trainer bench`: the configured run against its eager PyTorch reference, side by side.

One model initialisation and one data order (the same seed and the same sampler on every side) are
trained twice, each side in a process of its own (trainer/bench/worker.py) so that its peak memory
is its own:

- reference: the same model with every op on its plain PyTorch reference (materialised logits and
  F.cross_entropy), fp32 compute and parameters, no torch.compile, no activation checkpointing,
  AdamW with fp32 states;
- optimized: the configured run (kernels, compile, checkpointing, optimizer, dtype).

`--bench.peer=hf` adds a third side: Hugging Face transformers.Trainer with LlamaForCausalLM on the
same initial weights and batches, with AdamW and the same LR schedule, in the configured dtype
(`hf-liger`: with use_liger_kernel, CUDA only). A Hugging Face model shifts labels itself and scores
seq_len-1 predictions per block; when a peer runs, every side ignores the last label of each block
so all of them score exactly the same predictions. trainer/bench/verdict.py says how the losses are
judged, trainer/bench/report.py how the figures are computed.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from trainer.bench.machine_load import OtherLoad, untrusted_because
from trainer.bench.report import flops_per_token, json_safe, side_summary, write_plot
from trainer.bench.verdict import judge, loss_changes, relative_differences
from trainer.config import TrainConfig, to_toml
from trainer.errors import ConfigError, TrainerError
from trainer.output_dir import check_writable
from trainer.runtime import resolve_device

# Keys that trainer/parallel may define: the reference turns them off when they exist.
REFERENCE_OFF_KEYS = ("parallel.compile", "parallel.activation_checkpointing")
BENCH_OUTPUTS = ("bench.json", "bench.png", "trace-optimized.json")


class BenchError(TrainerError):
    pass


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


def check_bench_config(cfg: TrainConfig, device_type: str) -> None:
    b, t = cfg.bench, cfg.train
    if b.warmup_steps >= t.max_steps:
        raise ConfigError(
            f"bench.warmup_steps={b.warmup_steps} leaves no steady steps out of train.max_steps="
            f"{t.max_steps}; lower bench.warmup_steps or raise train.max_steps"
        )
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
            raise ConfigError(
                "bench.peer=hf-liger needs a CUDA GPU (Liger's kernels are Triton kernels); use bench.peer=hf on CPU"
            )
        if importlib.util.find_spec("liger_kernel") is None:
            raise ConfigError("bench.peer=hf-liger needs liger-kernel (pip install liger-kernel)")


def run_side(side: str, cfg: TrainConfig, out: Path, *, mask_last_label: bool, profile: bool) -> dict:
    side_dir = out / side
    side_dir.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(cfg)
    cfg.train.output_dir = str(side_dir)
    cfg.checkpoint.resume_from = ""  # bench always starts fresh
    cfg.train.overwrite = True  # each side's folder belongs to this bench
    cfg.train.log_every = 1  # a read-back after every step: per-step times, as the peer's are taken
    config_file, spec_file, result_file = (
        side_dir / name for name in ("bench_config.toml", "bench_spec.json", "bench_result.json")
    )
    config_file.write_text(to_toml(cfg))
    result_file.unlink(missing_ok=True)
    spec = {
        "side": side,
        "config": str(config_file),
        "result": str(result_file),
        "mask_last_label": mask_last_label,
        "warmup_steps": cfg.bench.warmup_steps,
        "peer": cfg.bench.peer,
        "profile_trace": str(out / f"trace-{side}.json") if profile else None,
    }
    spec_file.write_text(json.dumps(spec, indent=2))
    sys.stdout.flush()
    load = OtherLoad()
    proc = subprocess.run([sys.executable, "-m", "trainer.bench.worker", str(spec_file)])
    result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    if proc.returncode == 0 and "losses" in result:
        return {**result, "other_cpu_share": load.share()}
    if proc.returncode < 0 or proc.returncode == 130:
        raise KeyboardInterrupt
    if "error" in result:
        raise BenchError(f"{side} run: {result['error']}")
    raise BenchError(f"the {side} run failed (exit code {proc.returncode}); its output is above")


def run_bench(cfg: TrainConfig) -> dict:
    """Runs the sides, writes bench.json and bench.png; returns the report."""
    cfg = cfg.validate()
    b = cfg.bench
    check_bench_config(cfg, resolve_device(cfg.train.device).type)
    out = Path(cfg.train.output_dir or Path("runs") / datetime.now().strftime("bench-%Y%m%d-%H%M%S"))
    check_writable(out, "train.output_dir")
    if (out / "bench.json").exists() and not cfg.train.overwrite:
        raise BenchError(
            f"{out} already holds a bench.json; choose another --train.output_dir or pass "
            "--train.overwrite=true to replace it"
        )
    out.mkdir(parents=True, exist_ok=True)
    for stale in BENCH_OUTPUTS:
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
    caveats = untrusted_because(report)
    report.update(speed_trusted=not caveats, speed_caveats=caveats)
    report.update(
        {
            "steps": cfg.train.max_steps,
            "warmup_steps": b.warmup_steps,
            "tokens_per_step": opt["tokens_per_step"],
            "last_label_ignored": mask,
            "flops_per_token": flops_per_token(opt["model"], opt["seq_len"]),
            "flops_per_token_formula": "6N + 12*L*H*Q*T (PaLM appendix B; N = matmul parameters)",
            "model": opt["model"],
            "config": cfg.to_dict(),
            "env": {"device": opt["device"], "torch": opt["torch"], "triton": opt["triton"]},
        }
    )
    if "reference" in results:
        changes = loss_changes(cfg, opt["dtype"])
        verdict = judge(opt["losses"], results["reference"]["losses"], changes, b.tolerance)
        report.update(verdict)
        report["loss_changes"] = changes
        report["speedup"] = report["optimized"]["tokens_per_s"] / report["reference"]["tokens_per_s"]
        report["memory_ratio"] = report["optimized"]["peak_mem_bytes"] / report["reference"]["peak_mem_bytes"]
    else:
        report.update(
            {
                "max_rel_loss_diff": None,
                "tolerance": None,
                "passed": None,
                "criterion": "no eager reference ran (bench.reference=none): the optimized figures stand "
                "alone and the losses were not checked",
            }
        )
    if "peer" in results:
        peer = report.pop("peer")
        base = "reference" if "reference" in results else "optimized"
        peer.update(
            {
                "name": b.peer,
                "compared_with": base,
                "max_rel_loss_diff": max(relative_differences(peer["losses"], report[base]["losses"])),
                "optimized_speedup": report["optimized"]["tokens_per_s"] / peer["tokens_per_s"],
                "optimized_memory_ratio": report["optimized"]["peak_mem_bytes"] / peer["peak_mem_bytes"],
            }
        )
        report["peer"] = peer
        report["env"]["transformers"] = peer.get("transformers")
    (out / "bench.json").write_text(json.dumps(json_safe(report), indent=2) + "\n")
    plot = write_plot(report, out / "bench.png")
    report["files"] = (
        [str(out / "bench.json")]
        + ([str(plot)] if plot else [])
        + [report[s]["profile_trace"] for s in ("optimized",) if report[s].get("profile_trace")]
    )
    return report
