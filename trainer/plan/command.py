"""`python -m trainer plan [CONFIG] [--section.key=value ...] [--plan.device=NAME] [--json]`."""

from __future__ import annotations

import json
import os

from trainer.config import split_command_line
from trainer.errors import ConfigError
from trainer.ops.cross_entropy import MAX_MATERIALIZED_LOGIT_BYTES
from trainer.plan.choose import (
    NothingFits,
    SeqLenAnswer,
    choose_micro_batch,
    is_auto,
    longest_seq_len,
    nothing_fits_seq_len,
    suggest_changes,
)
from trainer.plan.devices import DEVICE_NAMES, budget_bytes, resolve_device
from trainer.plan.predict import Plan, predict_peak
from trainer.plan.units import human_bytes

USAGE = f"""usage: python -m trainer plan [CONFIG.toml] [--section.key=value ...] [--plan.device=NAME] [--json]
                              [--world-size N]

Predicts the peak memory of one training step of the configured run, without building the model,
says whether it fits the device and, if not, the cheapest changes that make it fit. Exits 1 when
it does not fit.

  --plan.device=NAME   {", ".join(DEVICE_NAMES)}, or auto (the device the run would train on)
  --plan.budget=BYTES  the memory to plan for instead of the device's
  --world-size N       ranks under parallel.strategy=ddp|fsdp (default: $WORLD_SIZE, else 1); figures are per rank
  --json               one JSON object instead of the table
  --train.micro_batch_size=auto  the largest micro-batch that fits (with --train.global_batch_size)
  --plan.solve=seq_len           the longest train.seq_len that fits, in multiples of 128 tokens,
                                 at the configured micro-batch, and what limits it (memory or the
                                 model's max_seq_len); the plan shown is the run at that length
  --plan.solve=micro_batch_size  what train.micro_batch_size=auto would use, and its plan
  When nothing fits, one line names the smallest need and a change that fits, and the exit
  status is 1.

How the planner counts: docs/memory.md."""


def _parse(argv: list[str]) -> tuple[str | None, list[str], bool, int | None]:
    """The plan's own --json and --world-size N, then [CONFIG] and --section.key=value overrides."""
    rest, as_json, world, i = [], False, None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--json":
            as_json = True
        elif arg.startswith("--world-size"):
            value = arg.partition("=")[2] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 0 if "=" in arg else 1
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"--world-size takes a positive integer, got {value!r}")
            world = int(value)
        else:
            rest.append(arg)
        i += 1
    path, overrides = split_command_line(rest)
    return path, overrides, as_json, world


def plan_command(argv: list[str]) -> int:
    """Prints the plan; returns 0 when the run fits the budget, 1 when it does not."""
    from trainer.config import load_config

    if "-h" in argv or "--help" in argv:
        print(USAGE)
        return 0
    path, overrides, as_json, world = _parse(argv)
    config = load_config(path, overrides)
    solve = config.plan.solve
    auto = is_auto(config.train.micro_batch_size) or solve == "micro_batch_size"
    world = world or int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(config)
    budget = budget_bytes(config, device)
    note, solved = "", {}
    if solve == "seq_len":
        if auto:
            raise ConfigError(
                "plan.solve=seq_len plans one micro-batch size, and train.micro_batch_size=auto chooses it from "
                "the seq_len; set --train.micro_batch_size (1 for the longest context)"
            )
        answer = longest_seq_len(config, budget, world)
        solved = _seq_len_solution(answer)
        if not answer.seq_len:
            return _nothing_fits(nothing_fits_seq_len(config, answer, budget, world), solved, budget, as_json)
        config.train.seq_len = answer.seq_len
        note = _seq_len_line(answer, budget)
    if auto:
        try:
            micro, accum, note = choose_micro_batch(config, budget, world)
        except NothingFits as error:
            solved = {"key": "train.micro_batch_size", "value": None}
            return _nothing_fits(str(error), solved, budget, as_json)
        config.train.micro_batch_size, config.train.grad_accum_steps = micro, accum
        if solve == "micro_batch_size":
            solved = {"key": "train.micro_batch_size", "value": micro, "grad_accum_steps": accum, "note": note}
    plan = predict_peak(config, world_size=world)
    fits = plan.fits(budget)
    suggestions = [] if fits else suggest_changes(config, budget, world)
    if as_json:
        out = {
            **plan.to_dict(),
            "budget_bytes": budget,
            "fits": fits,
            "device_memory_bytes": device.memory_bytes,
            "suggestions": [
                {
                    "changes": s.changes,
                    "why": s.why,
                    "peak_bytes": s.plan.peak_bytes,
                    "required_bytes": s.plan.required_bytes,
                }
                for s in suggestions
            ],
        }
        if note and auto:
            out["auto"] = note
        if solved:
            out["solve"] = solved
        print(json.dumps(out, indent=1))
    else:
        print(format_plan(config, plan, budget, device.name, suggestions, note))
    return 0 if fits else 1


def _seq_len_solution(answer: SeqLenAnswer) -> dict:
    out = {"key": "train.seq_len", "value": answer.seq_len or None, "step": answer.step, "limit": answer.limit}
    if answer.above is not None:
        out["next_required_bytes"] = answer.above.required_bytes
    if answer.problem:
        out["model_limit"] = answer.problem
    return out


def _seq_len_line(answer: SeqLenAnswer, budget: int) -> str:
    head = (
        f"longest train.seq_len that fits {human_bytes(budget)}: {answer.seq_len:,} tokens "
        f"(searched in multiples of {answer.step})"
    )
    further = answer.seq_len + answer.step
    if answer.limit == "model":
        return f"{head}; the model's limit binds: {further:,} tokens {answer.problem}"
    return f"{head}; memory binds: {further:,} tokens need {human_bytes(answer.above.required_bytes)}"


def _nothing_fits(line: str, solved: dict, budget: int, as_json: bool) -> int:
    """Not even the smallest setting fits: one line (or its JSON), and the does-not-fit status."""
    if as_json:
        print(json.dumps({"fits": False, "budget_bytes": budget, "solve": solved, "message": line}, indent=1))
    else:
        print(line)
    return 1


def describe_run(config, plan: Plan) -> str:
    t, o, p = config.train, config.optim, config.parallel
    model = config.model.from_hf or config.model.preset
    count = f"{plan.parameters / 1e9:.2f} B" if plan.parameters >= 1e8 else f"{plan.parameters / 1e6:.1f} M"
    on_rank = " on each tensor-parallel rank" if plan.tensor_parallel > 1 else ""
    lines = [
        f"{model} ({count} parameters{on_rank})",
        f"micro-batch {plan.micro_batch_size} x {t.seq_len} tokens, accumulation {plan.grad_accum_steps}",
        f"weights {t.param_dtype}, compute {plan.compute_dtype}",
        f"optim {o.name}",
        f"checkpointing {p.activation_checkpointing}",
    ]
    if getattr(p, "tiled_mlp", 0):
        lines.append(f"MLP in {p.tiled_mlp} tiles")
    if getattr(p, "activation_offloading", False):
        lines.append(
            "activations offloaded" if plan.device != "cpu" else "activation offloading (nothing moves on CPU)"
        )
    if plan.world_size > 1:
        tp = f", tensor parallel {plan.tensor_parallel}" if plan.tensor_parallel > 1 else ""
        lines.append(f"{p.strategy} over {plan.world_size} ranks{tp} (per rank)")
    return ", ".join(lines)


def format_plan(config, plan: Plan, budget: int, device: str, suggestions: list, note: str = "") -> str:
    width = max([len(k) for k in list(plan.breakdown) + list(plan.overheads)] + [10]) + 2
    out = [f"plan: {describe_run(config, plan)}, on {device}"]
    if note:
        out.append(note)
    tensors = " (tensors)" if plan.rss_bytes else ""
    out.append(f"peak of one step{tensors}: {human_bytes(plan.peak_bytes)}, in the {plan.phase} ({plan.at})")
    for name, nbytes in plan.breakdown.items():
        out.append(f"  {name:<{width}}{human_bytes(nbytes):>12}")
    for name, nbytes in plan.overheads.items():
        out.append(f"+ {name:<{width}}{human_bytes(nbytes):>12}")
    phases = ", ".join(f"{name} {human_bytes(v)}" for name, v in plan.phase_peaks.items() if name != "between steps")
    out.append(f"peak by phase: {phases}")
    if plan.rss_bytes:
        out.append(
            f"process (RSS): {human_bytes(plan.rss_bytes)}, the process's predicted peak resident memory (the "
            "tensors, the runtime, the run's build and the heap glibc keeps; fits is judged on tensors + runtime)"
        )
    if plan.ce_chunk_tokens < plan.ce_shape_chunk_tokens:
        out.append(
            f"fused loss: chunks of {plan.ce_chunk_tokens:,} tokens instead of {plan.ce_shape_chunk_tokens:,}, "
            f"within the {human_bytes(plan.ce_chunk_bytes)} the budget leaves them"
        )
    if plan.logits_whole:
        out.append(
            "fused loss: the logits are computed whole, being small enough (at most "
            f"{human_bytes(MAX_MATERIALIZED_LOGIT_BYTES)}) that chunks would only cost time"
        )
    if plan.host_bytes:
        out.append(f"pinned host memory for offloaded activations: {human_bytes(plan.host_bytes)} (not in the peak)")
    need = plan.required_bytes
    if plan.fits(budget):
        out.append(f"fits: needs {human_bytes(need)} of {human_bytes(budget)} ({human_bytes(budget - need)} to spare)")
        return "\n".join(out)
    out.append(f"does not fit: needs {human_bytes(need)} of {human_bytes(budget)}")
    if suggestions:
        out.append("changes that make it fit, cheapest first:")
        for s in suggestions:
            out.append(f"  {s.flags}  -> {human_bytes(s.plan.required_bytes)}  ({s.why})")
    else:
        out.append(
            "no change the planner tries makes it fit; use more devices (parallel.strategy=fsdp) or a smaller model"
        )
    return "\n".join(out)
