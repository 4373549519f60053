"""Builds a run's parts from its config: device, data, model, parallelism, optimizer, schedule, checkpoints.

`build_run(config)` checks everything that can be checked (the config, the output folder, the
data, the model and whether they fit together, the checkpoint to resume) before the output folder
is created or anything in it is replaced; only then does it claim the folder. The Trainer takes
the parts as they are; bench and tests build them, change what they need (a loader, the
evaluator, the checkpointer), and hand them in.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from trainer.callbacks import TrainerState
from trainer.checkpoint import Checkpointer, DamagedCheckpoint, checkpoint_dirs, load_checkpoint, newest_loadable
from trainer.config import TrainConfig, to_toml
from trainer.data import BlockLoader, PreparedData, build_tokenizer, prepare_data
from trainer.data.sft import SFTData, prepare_sft
from trainer.errors import CheckpointError, ConfigError
from trainer.evaluation import Evaluator
from trainer.lora import adapter_initial_values, apply_lora, base_weight_name, lora_summary
from trainer.metrics import truncate_metrics
from trainer.model_card import hardware_name, render_model_card
from trainer.models import KernelChoice, Transformer, build, empty_hf, load_hf
from trainer.models.config import PRESETS, resolve_args
from trainer.models.hf import args_from_hf_config, read_hf_config, weight_files
from trainer.ops.cross_entropy import MAX_MATERIALIZED_LOGIT_BYTES
from trainer.optim import build_optimizer, build_scheduler, state_bytes
from trainer.output_dir import OutputPlan, claim_output, plan_output
from trainer.parallel import ParallelEnv, init_distributed, is_sharded, main_process_first, parallelize
from trainer.parallel.distributed import barrier, env_from_launcher
from trainer.parallel.expert_parallel import check_expert_parallel
from trainer.parallel.float8 import check_float8
from trainer.parallel.materialize import materialize
from trainer.parallel.tensor_parallel import check_tensor_parallel
from trainer.plan import choose_micro_batch, loss_chunk_bytes, loss_logits_whole, resolve_budget
from trainer.plan.shapes import model_args
from trainer.runtime import DTYPE_NAMES, DTYPES, parameter_count, resolve_device, resolve_dtype, tensor_bytes

MODEL_SHAPE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "max_seq_len",
    "rope_theta",
    "tie_embeddings",
    "qkv_bias",
)


@dataclass
class RunParts:
    """Everything a Trainer needs; `model` is the plain module, `train_model` what training calls (DDP wraps it)."""

    config: TrainConfig
    env: ParallelEnv
    device: torch.device
    compute_dtype: torch.dtype
    output: OutputPlan
    data: PreparedData | SFTData
    model: nn.Module
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    loader: BlockLoader  # bench may wrap it (trainer/bench/side.py IgnoreLastLabel)
    evaluator: Evaluator | None  # None: no evaluation
    checkpointer: Checkpointer | None  # None: no checkpoints and no final/
    state: TrainerState
    messages: list[str] = field(default_factory=list)

    @property
    def tokenizer(self):
        return self.data.tokenizer

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def sharded(self) -> bool:
        return is_sharded(self.model)

    def memory_figures(self) -> dict[str, int]:
        """Bytes of the parameters, optimizer states and gradients, for the first step's metrics line."""
        in_backward = getattr(self.optimizer, "steps_in_backward", False)  # only layer-wise optimizers have it
        return {
            "param_bytes": tensor_bytes(self.params),
            "optim_state_bytes": state_bytes(self.optimizer),
            "grad_bytes": self.optimizer.peak_grad_bytes if in_backward else tensor_bytes(self.params),
        }

    def model_card(self, folder: Path) -> str:
        """The model card (README.md) of `folder`, final/ or a checkpoint, as the run stands now."""
        return render_model_card(
            folder,
            self.config,
            self.state,
            parameters=parameter_count(self.model.parameters()),
            trainable=parameter_count(self.params),
            precision=DTYPE_NAMES[self.compute_dtype],
            hardware=hardware_name(self.device),
            world_size=self.env.world_size,
            data_parallel=self.env.data_parallel_size,
        )

    def describe(self) -> str:
        """The line a run starts with: what trains, where, on what, into which folder."""
        n_params = parameter_count(self.params)
        ranks = f" | {self.env.world_size} ranks, {self.config.parallel.strategy}" if self.env.world_size > 1 else ""
        if self.env.tensor_parallel > 1:
            ranks += f" x tensor parallel {self.env.tensor_parallel}"
        return (
            f"model: {n_params / 1e6:.2f}M trainable parameters | device {self.device} | compute dtype "
            f"{str(self.compute_dtype).removeprefix('torch.')} | data: {self.data.describe()} "
            f"| output: {self.output.folder}{ranks}"
        )


def tokenizer_spec(config: TrainConfig) -> str:
    """data.tokenizer, except that fine-tuning with the default keeps the checkpoint's own tokenizer."""
    m, d = config.model, config.data
    if m.from_hf and d.tokenizer == "bpe" and (Path(m.from_hf) / "tokenizer.json").is_file():
        return m.from_hf
    return d.tokenizer


def load_run_data(config: TrainConfig, tokenizer: str | None = None):
    """The run's tokenizer and train/val data: token blocks (data.format=text) or packed examples (sft)."""
    d = config.data
    tokenizer = tokenizer or tokenizer_spec(config)
    if d.format == "sft":
        if tokenizer == "bpe":
            raise ConfigError(
                "data.format=sft needs an existing tokenizer: set model.from_hf to a folder with "
                "tokenizer.json, or data.tokenizer to such a folder (or to byte)"
            )
        return prepare_sft(d.path, build_tokenizer(tokenizer), config.train.seq_len, d.val_fraction)
    return prepare_data(
        d.path,
        tokenizer=tokenizer,
        vocab_size=d.vocab_size,
        val_fraction=d.val_fraction,
        cache_dir=d.cache_dir or None,
        text_field=d.text_field,
        weights=d.weights or None,
        num_workers=d.num_workers,
    )


def check_pretrained_fit(config: TrainConfig) -> None:
    """With model.from_hf the checkpoint fixes the shape, and its embeddings only mean something with its tokenizer."""
    m = config.model
    if config.lora.rank > 0 and not m.from_hf:
        raise ConfigError(
            f"lora.rank={config.lora.rank} adapts a pretrained model: set model.from_hf to its Hugging "
            "Face folder (its final/ adapter names that folder as its base), or lora.rank=0 to train "
            "every weight"
        )
    if not m.from_hf:
        return
    if not Path(m.from_hf).is_dir():
        raise ConfigError(
            f"model.from_hf={m.from_hf!r} is not a folder; pass a local Hugging Face model folder "
            "(config.json + *.safetensors)"
        )
    if not (Path(m.from_hf) / "config.json").is_file():
        raise ConfigError(
            f"model.from_hf={m.from_hf!r} has no config.json; pass a local Hugging Face model folder "
            "(config.json + *.safetensors)"
        )
    # Before the corpus is tokenized: an architecture or a config feature we do not implement, and
    # weights that are not there, are found in a moment.
    args_from_hf_config(read_hf_config(m.from_hf))
    try:
        missing = [file.name for file in weight_files(m.from_hf) if not file.is_file()]
    except CheckpointError:
        missing = ["model.safetensors (nor a model.safetensors.index.json)"]
    if missing:
        raise ConfigError(
            f"model.from_hf={m.from_hf!r} has no {missing[0]}: its weights are missing; pass a folder "
            "that save_pretrained wrote with safetensors (config.json + *.safetensors)"
        )
    given = [f"model.{k}" for k in MODEL_SHAPE_KEYS if getattr(m, k) is not None]
    if m.preset != "small":
        given.insert(0, "model.preset")
    if given:
        these = f"{', '.join(given[:-1])} and {given[-1]} do" if len(given) > 1 else f"{given[0]} does"
        raise ConfigError(
            f"{these} not apply with model.from_hf (the checkpoint's config.json fixes the shape); "
            f"remove {'them' if len(given) > 1 else 'it'}"
        )
    own = (Path(m.from_hf) / "tokenizer.json").is_file()
    if not own_tokenizer(config) and not m.allow_new_tokenizer:
        what = (
            f"data.tokenizer={config.data.tokenizer}"
            if own or config.data.tokenizer != "bpe"
            else f"{m.from_hf} has no tokenizer.json, so a new BPE tokenizer would be trained and"
        )
        raise ConfigError(
            f"{what} pairs the pretrained embeddings of {m.from_hf} with another tokenizer's ids; "
            "point data.tokenizer at the model's own tokenizer folder, or pass "
            "--model.allow_new_tokenizer=true if that is what you want"
        )


def own_tokenizer(config: TrainConfig) -> bool:
    """Whether the run's tokenizer is model.from_hf's own: that folder, or one mapping text to the same ids."""
    folder, spec = Path(config.model.from_hf), tokenizer_spec(config)
    if spec == "bpe" or not (folder / "tokenizer.json").is_file():
        return False  # a new BPE tokenizer would be trained on the corpus
    if Path(spec).is_dir() and Path(spec).resolve() == folder.resolve():
        return True
    return build_tokenizer(spec).fingerprint == build_tokenizer(str(folder)).fingerprint


def build_model(config: TrainConfig, tokenizer_vocab: int, on_meta: bool = False, ce_chunk_bytes: int = 0) -> nn.Module:
    """The model (from model.from_hf or the preset), checked against the tokenizer and seq_len: in
    the checkpoint's dtype (fp32 from scratch) on the CPU, or `on_meta` without weights (a sharded
    run materializes it after sharding: trainer/parallel/materialize.py). ce_chunk_bytes: the cap
    on the fused loss's logit chunks (KernelChoice.ce_chunk_bytes; 0: sized from the shape)."""
    m, t = config.model, config.train
    kernels = replace(KernelChoice.from_config(config.kernels), ce_chunk_bytes=ce_chunk_bytes)
    if m.from_hf:
        model = empty_hf(m.from_hf, kernels) if on_meta else load_hf(m.from_hf, kernels)
    else:
        if m.preset not in PRESETS:
            raise ConfigError(f"model.preset={m.preset!r} is unknown; choose one of: {', '.join(PRESETS)}")
        try:
            args = resolve_args(m.preset, tokenizer_vocab, **{k: getattr(m, k) for k in MODEL_SHAPE_KEYS})
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None
        if on_meta:
            with torch.device("meta"):
                model = Transformer(args, kernels)
        else:
            model = build(args, kernels=kernels, seed=t.seed)
    if tokenizer_vocab > model.args.vocab_size:
        fix = (
            "use the model's own tokenizer"
            if m.from_hf
            else f"set model.vocab_size >= {tokenizer_vocab} or use a matching tokenizer"
        )
        raise ConfigError(
            f"the tokenizer has {tokenizer_vocab} tokens but the model's vocabulary is only "
            f"{model.args.vocab_size}; {fix}"
        )
    check_seq_len(t.seq_len, model.args)
    return model


def check_seq_len(seq_len: int, args) -> None:
    """train.seq_len against the model's limits (ModelArgs.seq_len_problem), as a one-line ConfigError."""
    problem = args.seq_len_problem(seq_len)
    if problem:
        raise ConfigError(f"train.seq_len={seq_len} {problem}; use train.seq_len <= {args.max_seq_len}")


def effective_warmup(config: TrainConfig, messages: list[str]) -> None:
    """A warm-up as long as the run would make the whole run warm-up: shorten it to a tenth of the run, and say so."""
    o, t = config.optim, config.train
    if o.warmup_steps >= t.max_steps:
        shorter = t.max_steps // 10
        instead = f"warming up over {shorter} steps (a tenth of the run)" if shorter else "no warm-up"
        messages.append(
            f"optim.warmup_steps={o.warmup_steps} is not below train.max_steps={t.max_steps}; {instead} instead"
        )
        o.warmup_steps = shorter


def build_run(config: TrainConfig) -> RunParts:
    cfg, t = config.validate(), config.train
    messages: list[str] = []
    check_pretrained_fit(cfg)
    if cfg.parallel.expert_parallel > 1:
        n_experts = model_args(cfg).n_experts
        check_expert_parallel(cfg.parallel.expert_parallel, n_experts, env_from_launcher().world_size)
    if cfg.parallel.tensor_parallel > 1:
        check_tensor_parallel(cfg.parallel.tensor_parallel, model_args(cfg), env_from_launcher().world_size)
    output = plan_output(t, cfg.checkpoint)
    t.output_dir = str(output.folder)
    messages += output.messages
    effective_warmup(cfg, messages)
    env, device = init_distributed(cfg.parallel.strategy, resolve_device(t.device), cfg.parallel.tensor_parallel)
    compute_dtype = resolve_dtype(t.dtype, device)
    check_float8(t.float8, device, cfg.lora.rank)
    if t.micro_batch_size == "auto":  # the largest micro-batch the planner predicts to fit; saved in config.toml
        t.micro_batch_size, t.grad_accum_steps, note = choose_micro_batch(cfg, resolve_budget(cfg), env.world_size)
        messages.append(note)
    # The fused loss's chunks sized by the memory the planner predicts is left for them, once, here:
    # reading the free memory at each call would sync with the GPU. 0 (the shape's chunk) unless
    # that room is smaller than the shape's chunk needs.
    # (The vocabulary-parallel loss of tensor parallelism sizes its own chunks.)
    ce_chunk_bytes = loss_chunk_bytes(cfg, env.world_size) if env.mesh is None else 0
    if ce_chunk_bytes:
        messages.append(
            f"the fused loss's logit chunks are kept within {ce_chunk_bytes / 2**20:,.0f} MiB, "
            "the memory the planner predicts is left for them (python -m trainer plan shows the chunk)"
        )
    elif env.mesh is None and loss_logits_whole(cfg, env.world_size):
        messages.append(
            "the fused loss computes each micro-batch's logits whole: at most "
            f"{MAX_MATERIALIZED_LOGIT_BYTES / 2**20:g} MiB, too small for its chunks to be faster"
        )
    if t.threads:
        torch.set_num_threads(t.threads)
    with main_process_first(env):  # rank 0 fills the token cache first; the others read it
        data = load_run_data(cfg)

    torch.manual_seed(t.seed)
    # FSDP2 (and tensor parallelism): built on the meta device, with LoRA's adapters, sharded, then
    # each rank writes its shards only (no rank holds the whole model). LoRA on a randomly
    # initialised preset (no checkpoint to read by slices) is built whole.
    lora = cfg.lora.rank > 0
    sharded_build = cfg.parallel.strategy == "fsdp" and env.distributed and (not lora or bool(cfg.model.from_hf))
    model = build_model(cfg, data.tokenizer.vocab_size, on_meta=sharded_build, ce_chunk_bytes=ce_chunk_bytes)
    if sharded_build:
        model.to(dtype=DTYPES[t.param_dtype])
        if lora:
            apply_lora(model, cfg.lora, compute_dtype, seed=t.seed, fsdp_ranks=env.data_parallel_size)
            messages.append(lora_summary(model))
        model.model.neftune_alpha = t.neftune_alpha
        train_model = parallelize(model, cfg.parallel, env, device, compute_dtype, t.float8)
        adapters = adapter_initial_values(model, t.seed) if lora else ()
        materialize(model, device, cfg.model.from_hf or None, t.seed, adapters, base_weight_name)
        model.train()
    else:
        fsdp_ranks = env.data_parallel_size if cfg.parallel.strategy == "fsdp" else None
        place_model(model, cfg, device, compute_dtype, messages, fsdp_ranks)
        # The optimizer is built after sharding: FSDP2 replaces the parameters with their shards.
        train_model = parallelize(model, cfg.parallel, env, device, compute_dtype, t.float8)
    if cfg.parallel.expert_parallel > 1:
        n, e = cfg.parallel.expert_parallel, model.args.n_experts
        messages.append(
            f"expert parallelism: each of the {n} ranks holds {e // n} of the {e} experts of each MoE layer"
        )
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, t.max_steps)
    scaler = torch.amp.GradScaler(device.type) if compute_dtype == torch.float16 else None
    loader = BlockLoader(
        data.train,
        t.seq_len,
        t.micro_batch_size,
        t.grad_accum_steps,
        world_size=env.data_parallel_size,
        rank=env.data_parallel_rank,
        seed=t.seed,
        document_ids=cfg.data.document_mask,
    )
    state = resumed_state(
        output,
        loader,
        t.max_steps,
        messages,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        sharded=is_sharded(model),
    )

    # Everything is checked: only now is the folder created, or a previous run's outputs replaced.
    config_toml = to_toml(cfg)
    if env.is_main:
        claim_output(output)
        (output.folder / "config.toml").write_text(config_toml)
        truncate_metrics(output.folder / "metrics.jsonl", state.step)
    barrier()
    evaluator = None
    if data.val is not None:
        dp_size, dp_rank, dp_group = env.data_parallel_size, env.data_parallel_rank, env.data_parallel_group
        evaluator = Evaluator.for_run(cfg, data.val, device, compute_dtype, dp_size, dp_rank, dp_group)
    else:
        messages.append(
            f"no validation data (data.val_fraction={cfg.data.val_fraction} put no document of "
            f"{cfg.data.path} aside): the run will not be evaluated"
        )
    checkpointer = Checkpointer(
        output.folder,
        keep_last=cfg.checkpoint.keep_last,
        config_toml=config_toml,
        tokenizer=data.tokenizer,
        sharded=is_sharded(model),
        is_main=env.is_main,
        lora_base=cfg.model.from_hf or None,
        save_merged=cfg.lora.save_merged,
        async_save=cfg.checkpoint.async_save,
    )
    return RunParts(
        config=cfg,
        env=env,
        device=device,
        compute_dtype=compute_dtype,
        output=output,
        data=data,
        model=model,
        train_model=train_model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        loader=loader,
        evaluator=evaluator,
        checkpointer=checkpointer,
        state=state,
        messages=messages,
    )


def place_model(
    model: nn.Module,
    cfg: TrainConfig,
    device: torch.device,
    compute_dtype,
    messages: list[str],
    fsdp_ranks: int | None = None,
) -> None:
    """The model on its device in train.param_dtype, with LoRA's adapters (and 4-bit base) when asked;
    `fsdp_ranks`: the ranks FSDP2 will shard it over (the 4-bit base is then one FSDP2 can shard)."""
    t = cfg.train
    if cfg.lora.quantize == "nf4":
        # Each targeted layer goes to the device as it is quantized: the full-precision base never sits
        # there whole (15 GiB of bf16 for Llama-3-8B). A 4-bit weight cannot be cast after.
        model.to(dtype=DTYPES[t.param_dtype])
        apply_lora(model, cfg.lora, compute_dtype, device=device, seed=t.seed, fsdp_ranks=fsdp_ranks)
        model.to(device)
    else:
        model.to(device, dtype=DTYPES[t.param_dtype])
        if cfg.lora.rank > 0:
            apply_lora(model, cfg.lora, compute_dtype, seed=t.seed)
    if cfg.lora.rank > 0:
        messages.append(lora_summary(model))
    model.model.neftune_alpha = t.neftune_alpha
    model.train()


def resumed_state(output: OutputPlan, loader, max_steps: int, messages: list[str], **targets) -> TrainerState:
    """A fresh TrainerState, or the one of the checkpoint the output plan resumes, loaded into
    `targets` (model, optimizer, scheduler, scaler) and the loader."""
    resumed = resume(output, messages=messages, **targets)
    if resumed is None:
        return TrainerState(max_steps=max_steps)
    path, saved = resumed
    state = TrainerState.from_dict(saved["trainer"])
    if state.step >= max_steps:
        raise ConfigError(
            f"{path} is at step {state.step}, which train.max_steps={max_steps} does not go "
            "beyond; raise train.max_steps to train further"
        )
    state.max_steps = max_steps
    try:
        loader.load_state_dict(saved["sampler"])
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"the data sampler in {path} does not fit this run's data: {e}") from None
    messages.append(f"resumed from {path} at step {state.step}")
    return state


def resume(output: OutputPlan, *, messages: list[str], **targets) -> tuple[Path, dict] | None:
    """Loads the checkpoint the plan names into `targets` (model, optimizer, ...); returns (path, saved state).

    `latest` skips a damaged newest checkpoint, with a warning, for the one before it; a damaged
    checkpoint named explicitly is an error that names the newest loadable one.
    """
    if output.resume is not None:
        try:
            return output.resume, load_checkpoint(output.resume, **targets)
        except DamagedCheckpoint as e:
            fallback = newest_loadable(output.resume.parent, below=output.resume)
            hint = f"resume from {fallback} instead" if fallback else "no older checkpoint there loads either"
            raise CheckpointError(f"cannot resume: {e}; {hint}") from None
    if not output.resume_latest:
        return None
    damaged = []
    for candidate in reversed(checkpoint_dirs(output.folder)):
        try:
            saved = load_checkpoint(candidate, **targets)
        except DamagedCheckpoint as e:
            damaged.append(str(e))
            warnings.warn(f"checkpoint.resume_from=latest: skipping {candidate}: {e}", stacklevel=2)
            continue
        return candidate, saved
    raise CheckpointError(
        f"checkpoint.resume_from=latest: no checkpoint in {output.folder} loads "
        f"({'; '.join(damaged)}); pass --train.overwrite=true to start over"
    )
