"""Run configuration: nested dataclasses, a TOML file, and --section.key=value overrides.

Every key is spelled as README.md and docs/ spell it (other tools rely on those names). Unknown
keys are refused with the closest valid key named, bad values with the allowed ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from trainer.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def choice(default, *choices, help: str = ""):
    """A field whose value must be one of `choices`."""
    return field(default=default, metadata={"choices": choices, "help": help})


def int_or_auto(default: int):
    """An integer field that also takes the word `auto` (chosen when the run is built)."""
    return field(default=default, metadata={"auto": True})


@dataclass
class ModelConfig:
    # tiny: ~1M parameters for tests; small: the embedded default run; llama-1b/7b/8b: real shapes.
    preset: str = "small"
    from_hf: str = ""  # a local Hugging Face folder (config.json + safetensors); wins over the preset
    # Optional changes to the preset's shape; unset keeps the preset's value.
    vocab_size: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    max_seq_len: int | None = None
    rope_theta: float | None = None
    tie_embeddings: bool | None = None
    qkv_bias: bool | None = None
    # With from_hf: train the pretrained model with a tokenizer other than its own (its embeddings then
    # map other ids); refused unless set.
    allow_new_tokenizer: bool = False


@dataclass
class DataConfig:
    # file, folder, glob, comma list: text files, .jsonl(.gz|.zst) and .parquet (their text_field), save_to_disk folders
    path: str = "builtin:python-stdlib"
    # a mixture: one positive weight per comma-separated entry of path, e.g. "0.7,0.3" ("": one corpus, concatenated)
    weights: str = ""
    num_workers: int = 0  # processes that tokenize (the tokens are the same for any number); 0 = the CPU count
    tokenizer: str = "bpe"  # byte | bpe (trained on the corpus, cached) | a folder with tokenizer.json
    vocab_size: int = 4096  # for tokenizer=bpe
    val_fraction: float = 0.01
    text_field: str = "text"
    cache_dir: str = ""  # default: $TRAINER_CACHE_DIR or ~/.cache/trainer
    document_mask: bool = False  # attention never crosses a document inside a packed block
    # text: pretraining on raw text; sft: .jsonl of prompt/completion or messages, prompt tokens ignored
    # (examples packed into rows with document masking; see trainer/data/sft.py)
    format: str = choice("text", "text", "sft")


@dataclass
class TrainingConfig:
    """[train]: the run's length, batch, precision, device, output folder and its cadences."""

    max_steps: int = 800
    micro_batch_size: int | str = int_or_auto(8)  # per rank; auto: the largest that fits (trainer/plan)
    grad_accum_steps: int = 1
    seq_len: int = 256
    seed: int = 0
    dtype: str = choice("auto", "auto", "fp32", "bf16", "fp16", help="auto: bf16 on a GPU that has it, else fp32")
    param_dtype: str = choice("fp32", "fp32", "bf16")
    # float8 matmuls in the decoder's linear layers through torchao (trainer/parallel/float8.py):
    # tensorwise or rowwise scales; CUDA with compute capability 8.9+ only.
    float8: str = choice("none", "none", "tensorwise", "rowwise")
    device: str = choice("auto", "auto", "cpu", "cuda")
    output_dir: str = ""  # default: runs/<timestamp>
    overwrite: bool = False
    max_grad_norm: float = 1.0  # 0 disables clipping; the norm is reported either way
    eval_every: int = 100  # 0: only once, at the end
    eval_batches: int = 50  # batches per evaluation (0: the whole validation split)
    log_every: int = 10  # progress lines when not on a terminal
    max_nonfinite_steps: int = 5  # this many non-finite losses in a row stop the run
    progress: str = choice("auto", "auto", "bar", "lines", "none")
    # Experiment trackers that get what metrics.jsonl gets, on rank 0 (trainer/trackers.py): a comma list of
    # tensorboard, wandb, mlflow, trackio, or none.
    report_to: str = "none"
    tensorboard: bool = False  # the older spelling of report_to=tensorboard, kept so earlier config files load
    threads: int = 0  # CPU threads for torch; 0 keeps torch's default
    # NEFTune: uniform noise of magnitude neftune_alpha / sqrt(seq_len * hidden) on the input embeddings in
    # training forward passes only (Hugging Face Trainer's neftune_noise_alpha); 0: off.
    neftune_alpha: float = 0.0
    # micro_batch_size=auto (trainer/plan) picks the largest micro-batch whose predicted peak fits
    # memory_budget bytes (0: the device's memory) and sets grad_accum_steps so that the global batch is
    # global_batch_size sequences (0: micro_batch_size x grad_accum_steps x ranks as given).
    memory_budget: int = 0
    global_batch_size: int = 0


@dataclass
class OptimConfig:
    name: str = choice(
        "adamw",
        "adamw",
        "adamw8bit",
        "paged_adamw8bit",
        "galore_adamw",
        "galore_adamw8bit",
        "galore_adafactor",
        "adamw_layerwise",
        "adamw8bit_layerwise",
        "paged_adamw8bit_layerwise",
        "galore_adamw_layerwise",
        "galore_adamw8bit_layerwise",
        "galore_adafactor_layerwise",
        "apollo_adamw",
        "apollo_adamw_layerwise",
        help="see docs/optimizers.md; _layerwise: each parameter is updated inside backward",
    )
    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    schedule: str = choice(
        "cosine",
        "cosine",
        "linear",
        "constant",
        "wsd",
        help="after linear warmup: cosine or linear decay, constant, or warmup-stable-decay",
    )
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # the decay ends at lr * min_lr_ratio
    decay_fraction: float = 0.2  # wsd: the share of steps spent decaying at the end
    # GaLore (optim.name=galore_*): the gradient of each targeted matrix is projected onto its top
    # galore_rank singular vectors, recomputed every galore_update_proj_gap steps; the update is
    # projected back times galore_scale.
    galore_rank: int = 128  # clamped, with a warning, to min(rows, cols) of a smaller matrix
    galore_update_proj_gap: int = 200
    galore_scale: float = 0.25
    galore_proj_type: str = choice(
        "std",
        "std",
        "reverse_std",
        "left",
        "right",
        help="std: project the shorter side of each matrix away; left/right: force a side",
    )
    galore_target: str = r"self_attn|mlp"  # regex searched in the nn.Linear module names GaLore projects
    # APOLLO (optim.name=apollo_adamw*): AdamW moments of each targeted matrix's gradient under a random
    # projection to apollo_rank, turned into a per-row (channel) or per-matrix (tensor) scale of the raw
    # gradient; the projection is redrawn every apollo_update_proj_gap steps. APOLLO-Mini: rank 1, tensor, scale 128.
    apollo_rank: int = 128  # clamped, with a warning, to min(rows, cols) of a smaller matrix
    apollo_update_proj_gap: int = 200
    apollo_scale: float = 1.0  # the scaled gradient is multiplied by sqrt(apollo_scale)
    apollo_scale_type: str = choice(
        "channel",
        "channel",
        "tensor",
        help="channel: one scale per row (or column) of a matrix; tensor: one per matrix",
    )
    apollo_target: str = r"self_attn|mlp"  # regex searched in the nn.Linear module names APOLLO scales


@dataclass
class LoraConfig:
    """LoRA (Hu et al. 2021, arXiv:2106.09685): rank-`rank` adapters train beside the frozen base weights."""

    rank: int = 0  # 0: off (every weight trains)
    alpha: float = 16.0  # the adapter's output is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input, in training only
    target: str = r"self_attn|mlp"  # regex searched in the nn.Linear module names that get adapters
    # Mixture-of-experts models: regex searched in the names of the stacked expert weights
    # (model.layers.N.mlp.experts.gate_up_proj / down_proj) that get per-expert adapters, as PEFT's
    # target_parameters does ("experts" for all); "" for none. Takes no lora.dropout (nor does PEFT).
    target_parameters: str = ""
    quantize: str = choice(
        "none",
        "none",
        "nf4",
        help="nf4: QLoRA, the frozen base in 4-bit NormalFloat, double-quantized (bitsandbytes; torchao under FSDP2)",
    )
    save_merged: bool = True  # final/merged/: base and adapters merged into one Hugging Face model
    train_embeddings: bool = False  # also train the input embedding and the output head
    train_norms: bool = False  # also train the RMSNorm weights


@dataclass
class CheckpointConfig:
    save_every: int = 0  # 0: only at the end (a final checkpoint is always written)
    keep_last: int = 3  # 0: keep all; the best checkpoint by eval_loss is never deleted
    resume_from: str = ""  # a checkpoint folder, or "latest"
    # true: a save costs the step only a copy of the weights and optimizer state to host memory; a
    # thread writes them while training goes on (the checkpoint appears when complete, as always).
    async_save: bool = False


@dataclass
class BenchConfig:
    """`python -m trainer bench`: the configured run against its eager reference (and a peer)."""

    reference: str = choice(
        "eager", "eager", "none", help="none: skip the eager reference, e.g. when fp32 AdamW states cannot fit"
    )
    peer: str = choice(
        "none",
        "none",
        "hf",
        "hf-liger",
        help="also train transformers.Trainer on the same weights and batches; "
        "hf-liger adds use_liger_kernel (CUDA only)",
    )
    profile: bool = False  # also write a torch.profiler chrome trace of the optimized run
    warmup_steps: int = 2  # first steps left out of tokens/s (compilation, allocator and cache warm-up)
    tolerance: float = 0.0  # 0: chosen by what the optimized run changes (trainer/bench/verdict.py says how)
    peak_tflops: float = 0.0  # MFU denominator per GPU; 0: the device's datasheet figure, if known


@dataclass
class KernelConfig:
    enabled: bool = True  # false: every op runs its plain PyTorch reference, logits materialised
    rms_norm: bool = True
    rope: bool = True
    swiglu: bool = True
    fused_ce: bool = True


@dataclass
class ParallelConfig:
    compile: bool = False  # torch.compile each transformer block (fullgraph)
    activation_checkpointing: str = choice(
        "none",
        "none",
        "full",
        "selective",
        help="full: recompute each block in backward; selective: keep matmul and attention outputs, "
        "recompute the cheap elementwise ops",
    )
    # none: one process; ddp: replicate the model; fsdp: FSDP2 shards each block and the root.
    # ddp/fsdp take rank and world size from the environment that torchrun / accelerate launch set.
    strategy: str = choice("none", "none", "ddp", "fsdp")
    # false: keep blocks gathered from forward to backward (faster, more memory)
    fsdp_reshard_after_forward: bool = True
    fsdp_cpu_offload: bool = False  # parameters, gradients and optimizer states live in CPU memory
    # Tiled MLP: every dense MLP computed over this many tiles of its tokens, the (tokens x
    # intermediate_size) activations recomputed tile by tile in backward (trainer/parallel/tiled_mlp.py);
    # must divide train.seq_len. 0: off. MoE layers stay untiled.
    tiled_mlp: int = 0
    # What each block saves for backward waits in pinned host memory, prefetched one block ahead in
    # backward (trainer/parallel/offload.py). Saves memory on CUDA only; on CPU a pass-through.
    activation_offloading: bool = False
    # Mixture-of-experts models: each of N ranks holds 1/N of every MoE layer's experts, and token
    # copies travel to their expert's rank and back by all-to-all (with parallel.strategy=fsdp; N
    # must divide the experts and, for now, equal the number of ranks). 1: every rank holds them all.
    expert_parallel: int = 1
    # Tensor parallelism: each block's attention heads and MLP width split over N consecutive ranks,
    # the norms over the sequence, the vocabulary of the embedding and the loss over the same ranks
    # (trainer/parallel/tensor_parallel.py). With parallel.strategy=fsdp; the world size over N
    # ranks train on different batches (FSDP2 shards over them). 1: off.
    tensor_parallel: int = 1


@dataclass
class PlanConfig:
    """`python -m trainer plan`: the predicted peak memory of one training step, and whether it fits."""

    # h100-80gb, h200-141gb, a100-80gb, a100-40gb, l4-24gb, rtx4090-24gb, cpu (this machine's RAM);
    # auto: the device train.device trains on
    device: str = "auto"
    budget: int = 0  # bytes the run may use; 0: the device's memory
    solve: str = choice(
        "none",
        "none",
        "seq_len",
        "micro_batch_size",
        help="seq_len: the longest train.seq_len that fits (multiples of 128); micro_batch_size: what "
        "train.micro_batch_size=auto would use; none: the plan of the run as configured",
    )


@dataclass
class TrainConfig:
    """The whole run's config: one section per [table] of the TOML file."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainingConfig = field(default_factory=TrainingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)

    def validate(self) -> TrainConfig:
        for section in dataclasses.fields(self):
            sec = getattr(self, section.name)
            for f in dataclasses.fields(sec):
                allowed = f.metadata.get("choices")
                value = getattr(sec, f.name)
                if allowed and value not in allowed:
                    raise ConfigError(
                        f"{section.name}.{f.name}={value!r} is not allowed; choose one of: "
                        + ", ".join(map(str, allowed))
                    )
        t = self.train
        check_positive("train.max_steps", t.max_steps)
        if t.micro_batch_size != "auto":
            check_positive("train.micro_batch_size", t.micro_batch_size)
        check_positive("train.grad_accum_steps", t.grad_accum_steps)
        check_positive("train.seq_len", t.seq_len)
        check_positive("train.log_every", t.log_every)
        check_positive("train.max_nonfinite_steps", t.max_nonfinite_steps)
        check_positive("optim.lr", self.optim.lr)
        for key in (
            "train.eval_every",
            "train.eval_batches",
            "train.max_grad_norm",
            "optim.warmup_steps",
            "optim.weight_decay",
            "checkpoint.save_every",
            "checkpoint.keep_last",
            "train.threads",
            "bench.warmup_steps",
            "bench.tolerance",
            "bench.peak_tflops",
            "train.neftune_alpha",
            "train.memory_budget",
            "train.global_batch_size",
            "plan.budget",
        ):
            section, name = key.split(".")
            if getattr(getattr(self, section), name) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(getattr(self, section), name)}")
        if not 0 <= self.data.val_fraction < 1:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.data.val_fraction}")
        _check_data(self.data)
        report_to(t)
        if not 0 <= self.optim.min_lr_ratio <= 1 or not 0 <= self.optim.decay_fraction <= 1:
            raise ConfigError("optim.min_lr_ratio and optim.decay_fraction must be in [0, 1]")
        if t.param_dtype == "bf16" and t.dtype in ("fp32", "fp16"):
            raise ConfigError(f"train.param_dtype=bf16 needs train.dtype=bf16 or auto, got train.dtype={t.dtype}")
        p = self.parallel
        if p.strategy == "fsdp" and t.dtype == "fp16":
            raise ConfigError(
                "parallel.strategy=fsdp does not support train.dtype=fp16 (its loss scaler does not "
                "work on sharded gradients); use train.dtype=bf16 or fp32"
            )
        if p.strategy != "none" and self.optim.name.endswith("_layerwise"):
            raise ConfigError(
                f"optim.name={self.optim.name} updates each parameter inside backward, before the "
                f"ranks exchange gradients, so it cannot run with parallel.strategy={p.strategy}; "
                "use the optimizer without _layerwise"
            )
        if p.strategy == "fsdp" and self.optim.name != "adamw":
            raise ConfigError(
                f"parallel.strategy=fsdp needs optim.name=adamw (got {self.optim.name}: its states need "
                "whole, unsharded tensors); use parallel.strategy=ddp for it"
            )
        if p.fsdp_cpu_offload and p.strategy != "fsdp":
            raise ConfigError(f"parallel.fsdp_cpu_offload=true needs parallel.strategy=fsdp, got {p.strategy}")
        _check_tiled_mlp(p, t)
        if p.expert_parallel < 1:
            raise ConfigError(f"parallel.expert_parallel must be 1 or more, got {p.expert_parallel}")
        if p.expert_parallel > 1 and p.strategy != "fsdp":
            raise ConfigError(
                f"parallel.expert_parallel={p.expert_parallel} needs parallel.strategy=fsdp, got {p.strategy}"
            )
        _check_tensor_parallel(self)
        _check_optim(self)
        _check_lora(self)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_positive(key: str, value):
    """`value` if it is a number > 0; else a one-line ConfigError naming `key` (also for the data
    loader's arguments, so the rule lives here once)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value <= 0:
        raise ConfigError(f"{key} must be > 0, got {value!r}")
    return value


TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")  # train.report_to's names, in trainer/trackers.py


def report_to(t: TrainingConfig) -> list[str]:
    """train.report_to as a list of tracker names (train.tensorboard=true adds tensorboard); [] for none."""
    names = [n.strip().lower() for n in t.report_to.split(",") if n.strip()]
    if "none" in names and len(names) > 1:
        raise ConfigError(f"train.report_to={t.report_to!r} names none beside trackers; give either none or trackers")
    names = [n for n in names if n != "none"]
    for name in names:
        if name not in TRACKERS:
            close = difflib.get_close_matches(name, TRACKERS, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(
                f"train.report_to: unknown tracker {name!r}; {hint}choose from: {', '.join(TRACKERS)}, or none"
            )
    if t.tensorboard and "tensorboard" not in names:
        names.append("tensorboard")
    return list(dict.fromkeys(names))  # each once, in the order given


def _check_tensor_parallel(cfg: TrainConfig) -> None:
    """parallel.tensor_parallel against the settings it cannot run with (the model's shape and the
    world size are checked in trainer/parallel/tensor_parallel.py)."""
    p, n = cfg.parallel, cfg.parallel.tensor_parallel
    if n < 1:
        raise ConfigError(f"parallel.tensor_parallel must be 1 or more, got {n}")
    if n == 1:
        return
    if p.strategy != "fsdp":
        raise ConfigError(
            f"parallel.tensor_parallel={n} needs parallel.strategy=fsdp (FSDP2 shards over the "
            f"data-parallel ranks), got {p.strategy}"
        )
    refused = {
        "lora.rank > 0": cfg.lora.rank > 0,
        f"train.float8={cfg.train.float8}": cfg.train.float8 != "none",
        f"parallel.tiled_mlp={p.tiled_mlp}": p.tiled_mlp > 0,
        f"parallel.expert_parallel={p.expert_parallel}": p.expert_parallel > 1,
        "parallel.activation_offloading=true": p.activation_offloading,
        # torch 2.13's compiled autograd of a DTensor block fails ("'Tensor' object has no attribute 'elem'").
        "parallel.compile=true": p.compile,
        "train.micro_batch_size=auto": cfg.train.micro_batch_size == "auto",
    }
    for setting, present in refused.items():
        if present:
            raise ConfigError(
                f"parallel.tensor_parallel={n} does not work with {setting} yet; use parallel.tensor_parallel=1 "
                "or turn that setting off"
            )


def _check_data(d: DataConfig) -> None:
    """data.weights against data.path's entries, data.num_workers, and what a mixture cannot be."""
    if d.num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0 (0: one per CPU), got {d.num_workers}")
    if not d.weights.strip():
        return
    if d.format != "text":
        raise ConfigError(f"data.weights mixes pretraining sources; it does not apply to data.format={d.format}")
    parse_data_weights(d.weights, split_data_path(d.path))


def split_data_path(spec: str) -> list[str]:
    """The comma-separated entries of a data path (a real file whose name holds a comma is one entry)."""
    if os.path.exists(os.path.expanduser(spec)):
        return [spec]
    return [e.strip() for e in spec.split(",") if e.strip()]


def parse_data_weights(weights, entries: list[str]) -> list[float]:
    """data.weights ("0.7,0.3" or a list of numbers) checked against data.path's entries; normalised to sum 1."""
    items = [w.strip() for w in weights.split(",")] if isinstance(weights, str) else list(weights)
    if len(items) != len(entries):
        raise ConfigError(
            f"data.weights has {len(items)} value(s) but data.path has {len(entries)} comma-separated "
            f"source(s) ({', '.join(repr(e) for e in entries)}); give one positive weight per source"
        )
    values = []
    for item in items:
        try:
            value = float(item)
        except (TypeError, ValueError):
            raise ConfigError(
                f"data.weights: {item!r} is not a number; give positive numbers such as 0.7,0.3"
            ) from None
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(
                f"data.weights must all be positive numbers, got {item!r}; leave a source out of "
                "data.path instead of giving it weight 0"
            )
        values.append(value)
    total = sum(values)
    return [v / total for v in values]


def _check_tiled_mlp(p: ParallelConfig, t: TrainingConfig) -> None:
    """parallel.tiled_mlp: a tile count that splits every training sequence evenly, without compile."""
    n = p.tiled_mlp
    if isinstance(n, bool) or n < 0:
        raise ConfigError(f"parallel.tiled_mlp must be >= 0 (0 turns tiling off), got {n!r}")
    if n == 0:
        return
    if t.seq_len % n:
        divisors = [d for d in range(1, t.seq_len + 1) if t.seq_len % d == 0]
        below = max(d for d in divisors if d < n)
        above = [d for d in divisors if d > n]
        nearest = f"{below} or {above[0]}" if above else str(below)
        raise ConfigError(
            f"parallel.tiled_mlp={n} does not divide train.seq_len={t.seq_len} into equal tiles; "
            f"use {nearest} (the nearest divisors of {t.seq_len})"
        )
    if p.compile:
        raise ConfigError(
            "parallel.tiled_mlp with parallel.compile=true is not supported: the tiled MLP's backward "
            "re-runs the MLP inside an autograd Function that torch.compile(fullgraph=True) cannot "
            "trace; set parallel.compile=false or parallel.tiled_mlp=0"
        )


def _check_optim(cfg: TrainConfig) -> None:
    """Optimizer values, and the combinations a layer-wise or GaLore optimizer cannot run in."""
    o, t = cfg.optim, cfg.train
    if not all(0 <= beta < 1 for beta in o.betas):
        raise ConfigError(f"optim.betas must both be in [0, 1), got {o.betas}")
    check_positive("optim.eps", o.eps)
    if o.name.startswith("galore_"):
        check_positive("optim.galore_rank", o.galore_rank)
        check_positive("optim.galore_update_proj_gap", o.galore_update_proj_gap)
        check_positive("optim.galore_scale", o.galore_scale)
        _check_regex("optim.galore_target", o.galore_target)
    if o.name.startswith("apollo_"):
        check_positive("optim.apollo_rank", o.apollo_rank)
        check_positive("optim.apollo_update_proj_gap", o.apollo_update_proj_gap)
        check_positive("optim.apollo_scale", o.apollo_scale)
        _check_regex("optim.apollo_target", o.apollo_target)
    # Layer-wise and 8-bit optimizers under DDP/FSDP are refused in validate() beside the other parallel checks.
    if o.name.startswith("galore_") and cfg.parallel.strategy != "none":
        raise ConfigError(
            f"optim.name={o.name} with parallel.strategy={cfg.parallel.strategy} is not supported: "
            "each rank would project its own gradient (or shard) onto a different subspace; use "
            "optim.name=adamw or adamw8bit, or parallel.strategy=none"
        )
    if not o.name.endswith("_layerwise"):
        return
    # These updates happen inside backward, before the step's gradients are all known (trainer/optim/layerwise.py).
    if t.max_grad_norm > 0:
        raise ConfigError(
            f"optim.name={o.name} updates each layer during backward, before the global gradient "
            "norm is known, so it cannot clip; set train.max_grad_norm=0 (or drop _layerwise)"
        )
    if t.grad_accum_steps > 1:
        raise ConfigError(
            f"optim.name={o.name} frees each gradient as soon as it is used, so gradients cannot "
            "accumulate over micro-batches; set train.grad_accum_steps=1 and raise "
            "train.micro_batch_size, or drop _layerwise"
        )
    if t.dtype == "fp16":
        raise ConfigError(
            f"optim.name={o.name} cannot use fp16's loss scaler, which must skip overflowing "
            "updates after backward; use train.dtype=bf16 or fp32"
        )


def _check_regex(key: str, value: str) -> None:
    try:
        re.compile(value)
    except re.error as e:
        raise ConfigError(f"{key}={value!r} is not a valid regex: {e}") from None


def _check_lora(cfg: TrainConfig) -> None:
    """LoRA values, and the settings LoRA cannot be combined with (trainer/lora.py)."""
    lo = cfg.lora
    if lo.rank < 0:
        raise ConfigError(f"lora.rank must be >= 0 (0 turns LoRA off), got {lo.rank}")
    if lo.rank == 0:
        if lo.quantize != "none":
            raise ConfigError(
                f"lora.quantize={lo.quantize} quantizes the frozen base under LoRA adapters; "
                "set lora.rank > 0 (e.g. 16) or lora.quantize=none"
            )
        return
    check_positive("lora.alpha", lo.alpha)
    if not 0 <= lo.dropout < 1:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {lo.dropout}")
    _check_regex("lora.target", lo.target)
    if lo.target_parameters:
        _check_regex("lora.target_parameters", lo.target_parameters)
        if lo.dropout > 0:
            raise ConfigError(
                f"lora.target_parameters={lo.target_parameters!r} takes no lora.dropout (PEFT's expert adapters "
                f"have none); set lora.dropout=0, or lora.target_parameters='' to adapt only linear layers"
            )
        if cfg.parallel.expert_parallel > 1:
            raise ConfigError(
                "lora.target_parameters with parallel.expert_parallel > 1 is not supported; adapt the "
                "experts in one process or under FSDP without expert parallelism"
            )
    name = cfg.optim.name
    if name.startswith(("galore_", "apollo_")):
        method = "GaLore" if name.startswith("galore_") else "APOLLO"
        raise ConfigError(
            f"optim.name={name} with lora.rank={lo.rank} is not supported: {method} works on the "
            "full weight matrices, which LoRA freezes; use optim.name=adamw or adamw8bit (with or "
            "without _layerwise) for LoRA, or lora.rank=0 for " + method
        )


# ---------------------------------------------------------------- loading and overrides


def _valid_keys(cfg: TrainConfig) -> list[str]:
    return [f"{s.name}.{f.name}" for s in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, s.name))]


def _unknown_key(key: str, cfg: TrainConfig) -> ConfigError:
    close = difflib.get_close_matches(key, _valid_keys(cfg), n=1, cutoff=0.5)
    if not close:  # a key given without its section, e.g. "max_steps"
        close = [k for k in _valid_keys(cfg) if k.split(".", 1)[1] == key.split(".")[-1]]
    hint = f"; did you mean {close[0]}?" if close else "; see `python -m trainer train --help` for the keys"
    return ConfigError(f"unknown config key {key!r}{hint}")


def _parse_value(key: str, text, annotation, current):
    """Converts `text` (a string from the command line or a TOML value) to the field's type."""
    kind = _field_type(annotation)
    if text is None:
        return None
    optional = "None" in annotation
    if optional and isinstance(text, str) and text.lower() in ("none", "null", ""):
        return None
    try:
        if kind is bool:
            if isinstance(text, bool):
                return text
            low = str(text).lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            if isinstance(text, bool) or (isinstance(text, float) and not text.is_integer()):
                raise ValueError
            return int(text)
        if kind is float:
            if isinstance(text, bool):
                raise ValueError
            return float(text)
        if kind is tuple:
            items = text.split(",") if isinstance(text, str) else list(text)
            values = tuple(float(v) for v in items)
            if len(values) != len(current):
                raise ValueError
            return values
        if not isinstance(text, str):
            raise ValueError
        return text
    except (TypeError, ValueError):
        expected = {
            bool: "true or false",
            int: "an integer",
            float: "a number",
            str: "a string",
            tuple: "comma-separated numbers",
        }[kind]
        raise ConfigError(f"{key}={text!r} is not valid: expected {expected}") from None


def _field_type(annotation: str):
    # Annotations are strings here (from __future__ import annotations).
    for name, kind in (("bool", bool), ("int", int), ("float", float), ("tuple", tuple), ("str", str)):
        if annotation.startswith(name):
            return kind
    raise TypeError(f"unsupported config annotation {annotation}")


def set_value(cfg: TrainConfig, key: str, value) -> None:
    if key.count(".") != 1:
        raise _unknown_key(key, cfg)
    section_name, name = key.split(".")
    section = getattr(cfg, section_name, None)
    if not dataclasses.is_dataclass(section):
        raise _unknown_key(key, cfg)
    fields = {f.name: f for f in dataclasses.fields(section)}
    if name not in fields:
        raise _unknown_key(key, cfg)
    if fields[name].metadata.get("auto") and isinstance(value, str) and value.strip().lower() == "auto":
        setattr(section, name, "auto")
        return
    setattr(section, name, _parse_value(key, value, fields[name].type, getattr(section, name)))


def split_command_line(argv: list[str]) -> tuple[str | None, list[str]]:
    """[CONFIG_FILE] then --section.key=value (or --section.key value) overrides."""
    path, overrides, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            if "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                arg = f"{arg}={argv[i + 1]}"
                i += 1
            overrides.append(arg)
        elif path is None:
            path = arg
        else:
            raise ConfigError(f"unexpected argument {arg!r}; overrides take the form --section.key=value")
        i += 1
    return path, overrides


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> TrainConfig:
    """Defaults, then the TOML file, then overrides ("section.key=value" strings or a dict)."""
    cfg = TrainConfig()
    if path:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {str(path)!r} is a folder; pass a .toml file")
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}") from None
        for section_name, values in data.items():
            if not isinstance(values, dict):
                raise _unknown_key(section_name, cfg)
            for name, value in values.items():
                set_value(cfg, f"{section_name}.{name}", value)
    if isinstance(overrides, dict):
        overrides = [f"{k}={v}" for k, v in overrides.items()]
    for item in overrides or []:
        key, sep, value = item.removeprefix("--").partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} needs the form --section.key=value")
        set_value(cfg, key, value)
    return cfg.validate()


def to_toml(cfg: TrainConfig) -> str:
    """The effective config as TOML (unset optional keys are left out: TOML has no null)."""
    lines = []
    for section_name, values in cfg.to_dict().items():
        lines.append(f"[{section_name}]")
        for name, value in values.items():
            if value is not None:
                lines.append(f"{name} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def describe_keys() -> str:
    """One line per key, with its default and allowed values, for --help."""
    cfg = TrainConfig()
    out = []
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            allowed = f.metadata.get("choices")
            default = getattr(getattr(cfg, section.name), f.name)
            extra = f" (one of {', '.join(allowed)})" if allowed else " (or auto)" if f.metadata.get("auto") else ""
            out.append(f"  --{section.name}.{f.name}={default}{extra}")
    return "\n".join(out)
