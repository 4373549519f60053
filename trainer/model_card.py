"""The model card (README.md) of final/ and of each checkpoint, in the Hugging Face hub's format.

YAML metadata first (base model, library, tags, datasets by path, the base's license), then what
a colleague asks of a checkpoint: what it was trained from and on, the settings that matter, the
loss it reached, how many tokens it saw, on what hardware and for how long, and how to load it
(with PEFT for an adapter). huggingface_hub's ModelCard.load reads it.
"""

from __future__ import annotations

import math
import platform
import re
from pathlib import Path

import torch
import yaml

from trainer.config import TrainConfig, split_data_path
from trainer.metrics import format_duration


def hub_id(path: str) -> str | None:
    """The hub id of a model folder that huggingface_hub downloaded (…/models--org--name/snapshots/<rev>)."""
    match = re.search(r"models--([^/]+?)--([^/]+)/snapshots/[^/]+/?$", path)
    return f"{match.group(1)}/{match.group(2)}" if match else None


def card_metadata(text: str) -> dict:
    """The YAML block a README.md starts with ({} when there is none or it does not parse)."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def base_license(base: Path) -> dict:
    """license (and license_name / license_link, for `other`) from the base model's own card, if it has one."""
    readme = base / "README.md"
    meta = card_metadata(readme.read_text(errors="replace")) if readme.is_file() else {}
    return {key: meta[key] for key in ("license", "license_name", "license_link") if meta.get(key)}


def hardware_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:  # Linux names the CPU model here; platform.processor() is often empty
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU ({cpu})" if cpu else "CPU"


def render_model_card(
    folder: Path,
    config: TrainConfig,
    state,
    *,
    parameters: int,
    trainable: int,
    precision: str,
    hardware: str,
    world_size: int,
    data_parallel: int | None = None,
) -> str:
    """README.md for `folder` (final/ or checkpoint-<step>/) of a run in the given state (a
    TrainerState). data_parallel: the ranks with batches of their own (default world_size; fewer
    under tensor parallelism)."""
    m, d, t, o, lo = config.model, config.data, config.train, config.optim, config.lora
    adapter = lo.rank > 0
    base = m.from_hf
    datasets = split_data_path(d.path)

    meta: dict = {}
    if base:
        meta["base_model"] = hub_id(str(Path(base).resolve())) or base
    meta["library_name"] = "peft" if adapter else "transformers"
    meta["pipeline_tag"] = "text-generation"
    tags = ["kernel-trainer", "text-generation"]
    if adapter:
        tags += ["lora", "qlora"] if lo.quantize == "nf4" else ["lora"]
    if d.format == "sft":
        tags.append("sft")
    meta["tags"] = tags
    meta["datasets"] = datasets
    if base and Path(base).is_dir():
        meta.update(base_license(Path(base)))

    run_name = folder.parent.name
    title = run_name if folder.name == "final" else f"{run_name} ({folder.name})"
    if adapter:
        what = f"A LoRA adapter (rank {lo.rank}{', on a 4-bit NF4 base' if lo.quantize == 'nf4' else ''}) for `{base}`"
    elif base:
        what = f"`{base}` fine-tuned"
    else:
        what = f"A Llama-family causal language model (preset `{m.preset}`) trained from scratch"
    batches = world_size if data_parallel is None else data_parallel
    tokens_per_step = t.micro_batch_size * t.grad_accum_steps * batches * t.seq_len
    lines = [
        f"# {title}",
        "",
        f"{what} with kernel-trainer: {state.step:,} of {t.max_steps:,} steps, "
        f"{state.tokens_seen:,} label tokens seen. {parameters:,} parameters"
        + (f", {trainable:,} of them trained." if trainable != parameters else "."),
        "",
        "## Results",
        "",
        *results_table(state),
        "",
        "## Training",
        "",
        "| setting | value |",
        "| --- | --- |",
        f"| data | {', '.join(f'`{p}`' for p in datasets)}"
        + (f" (weights {d.weights})" if d.weights else "")
        + f", format {d.format}, tokenizer `{d.tokenizer}` |",
        f"| batch | {t.micro_batch_size} sequences x {t.grad_accum_steps} accumulation x {batches} rank(s) "
        f"of {t.seq_len} tokens = {tokens_per_step:,} tokens per step |",
        f"| optimizer | {o.name}, lr {o.lr:g}, weight decay {o.weight_decay:g}, betas {tuple(o.betas)} |",
        f"| schedule | {o.schedule}, {o.warmup_steps} warmup steps, down to {o.min_lr_ratio:g} x lr |",
        f"| precision | {precision} compute, {t.param_dtype} weights |",
        f"| gradient clipping | {t.max_grad_norm:g} |" if t.max_grad_norm else "| gradient clipping | off |",
        f"| seed | {t.seed} |",
    ]
    if adapter:
        lines.append(
            f"| LoRA | rank {lo.rank}, alpha {lo.alpha:g}, dropout {lo.dropout:g}, targets `{lo.target}`"
            + (", quantized base nf4" if lo.quantize == "nf4" else "")
            + " |"
        )
    if t.neftune_alpha:
        lines.append(f"| NEFTune | alpha {t.neftune_alpha:g} |")
    runtime = format_duration(state.runtime_s) if state.runtime_s else "n/a"
    lines += [
        "",
        f"Trained on {world_size} x {hardware} for {runtime}.",
        "The whole configuration is in `run_config.toml` beside this card.",
        "",
        "## How to load it",
        "",
        *usage(folder, adapter, base, lo.save_merged and folder.name == "final"),
    ]
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip()
    return f"---\n{front}\n---\n\n" + "\n".join(lines) + "\n"


def results_table(state) -> list[str]:
    """The last eval loss (and perplexity), the best one, and the last training loss, from the log history."""
    evals = [r for r in state.log_history if r.get("eval_loss") is not None]
    train = [r for r in state.log_history if r.get("loss") is not None and math.isfinite(r["loss"])]
    rows = ["| metric | value |", "| --- | --- |"]
    if evals:
        last = evals[-1]
        perplexity = last.get("perplexity") or math.exp(min(last["eval_loss"], 700.0))
        rows.append(f"| eval loss (step {last['step']}) | {last['eval_loss']:.4f} |")
        rows.append(f"| eval perplexity (step {last['step']}) | {perplexity:.2f} |")
    if state.best_metric is not None:
        rows.append(f"| best eval loss | {state.best_metric:.4f} |")
    if train:
        rows.append(f"| train loss (step {train[-1]['step']}) | {train[-1]['loss']:.4f} |")
    rows.append(f"| label tokens seen | {state.tokens_seen:,} |")
    return rows


def usage(folder: Path, adapter: bool, base: str, merged: bool) -> list[str]:
    if adapter:
        lines = [
            "With PEFT, which reads the base model's path from `adapter_config.json`:",
            "",
            "```python",
            "from peft import AutoPeftModelForCausalLM",
            "from transformers import AutoTokenizer",
            "",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{folder}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{folder}")',
            "```",
            "",
            "or on a base model already loaded:",
            "",
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{base}")',
            f'model = PeftModel.from_pretrained(base, "{folder}")',
            "```",
        ]
        if merged:
            lines += ["", f"`{folder / 'merged'}` holds base and adapter merged into one model for transformers."]
        return lines
    return [
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{folder}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{folder}")',
        "```",
        "",
        f"or `python -m trainer eval {folder}` / `python -m trainer generate {folder} --prompt ...`.",
    ]
