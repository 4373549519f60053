"""LoRA and QLoRA on our Transformer, saved and loaded in PEFT's adapter format.

LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685): a
targeted linear layer y = W x keeps W frozen and learns y = W x + (alpha / r) B A dropout(x), with
A (r x in) initialised as PEFT does by default (Kaiming-uniform, a = sqrt(5)) and B (out x r) at
zero, so training starts from the base model. QLoRA (Dettmers et al., arXiv:2305.14314) keeps the
frozen W in 4-bit NormalFloat with double-quantized scales: bitsandbytes' Linear4bit in one process
or under DDP, torchao's NF4Tensor (NF4Linear) under FSDP2, which shards and all-gathers it in 4
bits (bitsandbytes' 4-bit weights cannot be sharded).

The layer is ours (LoraLinear, a few lines) rather than PEFT's injected LoraLayer: its forward is
a plain function of its inputs, so the block-wise torch.compile, activation checkpointing and
FSDP2 treat it like any other module, and the merge of a 4-bit base is done in full precision
(PEFT merges into the 4-bit weight and quantizes the sum again). Its parameter names are PEFT's
(`base_layer`, `lora_A`, `lora_B`), so PEFT's own format is a renaming away: save_adapter writes
adapter_config.json through peft.LoraConfig and adapter_model.safetensors under PEFT's key names,
and the tests load that folder with peft.PeftModel.from_pretrained.

Every trainable tensor is fp32 (the adapters, and embeddings or norms unfrozen with
lora.train_embeddings / lora.train_norms, upcast when the base is bf16): an Adam step of ~lr on a
weight near 0.1 or 1 is below bf16's resolution there and would be rounded away. The frozen base
keeps its dtype. Under autocast the adapters compute in the autocast dtype like every matmul.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from trainer.errors import CheckpointError, ConfigError
from trainer.files import follow_umask
from trainer.models.nf4 import NF4Linear, dense
from trainer.runtime import parameter_count

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix for a causal LM: PeftModel -> LoraModel -> the model
# adapter_config.json settings that change what an adapter computes and that we do not implement.
UNSUPPORTED_PEFT_OPTIONS = (
    "use_dora",
    "use_rslora",
    "rank_pattern",
    "alpha_pattern",
    "lora_bias",
    "fan_in_fan_out",
    "layers_to_transform",
    "layer_replication",
    "exclude_modules",
    "trainable_token_indices",
    "use_qalora",
    "alora_invocation_tokens",
    "use_bdlora",
)


@dataclass
class AdapterSpec:
    """What apply_lora did to a model (kept as `model.lora`): enough to save, merge and reload it."""

    rank: int
    alpha: float
    dropout: float
    quantize: str  # "none" | "nf4"
    targets: list[str]  # the full names of the linear layers that carry adapters
    modules_to_save: list[str]  # PEFT's modules_to_save: names of the unfrozen embedding / norm modules
    # the full names of the stacked expert weights (MoE) that carry per-expert adapters
    target_parameters: list[str] = field(default_factory=list)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoraLinear(nn.Module):
    """base_layer(x) + B(A(dropout(x))) * alpha / rank, with base_layer (nn.Linear, bitsandbytes'
    Linear4bit or NF4Linear) frozen and A, B in fp32."""

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        device = base_layer.weight.device
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / rank
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default init
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        # Outside autocast a bf16 input meets fp32 adapters: cast it (a no-op in fp32 runs).
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return result + (update * self.scaling).to(result.dtype)

    def dense_base_weight(self) -> torch.Tensor:
        """The frozen base weight as a dense tensor (dequantized from nf4), in its original dtype."""
        weight = self.base_layer.weight
        if getattr(weight, "quant_state", None) is not None:
            import bitsandbytes as bnb

            return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
        return dense(weight.detach())


class ExpertLora(nn.Module):
    """Per-expert adapters on one stacked expert weight W (experts, out, in) of trainer.models.moe:
    expert e computes with W[e] + alpha / rank * B_e @ A_e, A_e (rank x in), B_e (out x rank), in fp32.

    Stored as PEFT stores a targeted 3-D parameter (its lora ParamWrapper), so saving is a renaming
    away: lora_A (experts * rank, in) with expert e's rows at e * rank; lora_B (out, rank * experts)
    with expert e's columns at j * experts + e. Initialised as LoraLinear (B at zero)."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float):
        super().__init__()
        self.experts, out_features, in_features = weight.shape
        self.rank, self.scaling = rank, alpha / rank
        kw = dict(device=weight.device, dtype=torch.float32)
        self.lora_A = nn.Parameter(torch.empty(self.experts * rank, in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank * self.experts, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's (PEFT's) init of lora_A

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (experts, rank, in), B (experts, out, rank))."""
        a = self.lora_A.view(self.experts, self.rank, -1)
        b = self.lora_B.view(self.lora_B.shape[0], self.rank, self.experts).permute(2, 0, 1)
        return a, b

    def delta(self) -> torch.Tensor:
        """alpha / rank * B_e @ A_e for every expert: (experts, out, in), fp32."""
        a, b = self.factors()
        return torch.bmm(b, a) * self.scaling

    def forward(self, x: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """The adapters' part of x's rows (sorted by expert, expert e's ending at ends[e])."""
        from trainer.models.moe import autocast_to
        from trainer.ops.grouped_mm import grouped_mm

        a, b = self.factors()
        x, a, b = autocast_to(x.to(a.dtype), a, b)
        return grouped_mm(grouped_mm(x, a.transpose(1, 2), ends), b.transpose(1, 2).contiguous(), ends) * self.scaling


def expert_weight_names(model: nn.Module) -> list[str]:
    """The full names of the model's stacked expert weights (MoE layers), in model order."""
    from trainer.models.moe import Experts

    return [
        f"{name}.{leaf}" for name, m in model.named_modules() if isinstance(m, Experts) for leaf in Experts.ADAPTABLE
    ]


# ---------------------------------------------------------------- adding adapters


def apply_lora(
    model: nn.Module,
    lora_cfg,
    compute_dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
    seed: int = 0,
    fsdp_ranks: int | None = None,
) -> nn.Module:
    """Adds LoRA adapters to `model` (a trainer Transformer) in place, as `lora_cfg` (the [lora]
    section) says, freezes everything else but what train_embeddings / train_norms unfreeze, and
    returns it. quantize=nf4 replaces each targeted base by a 4-bit Linear4bit computing in
    `compute_dtype` (the run's compute dtype), on `device` (default: where the weights are), or,
    under FSDP2 (`fsdp_ranks`: the number of ranks it shards over), by an NF4Linear, which FSDP2
    can shard (on the meta device it is quantized as trainer/parallel/materialize.py writes it).

    Call it on the model in its parameter dtype and on its device, before activation checkpointing,
    compile, FSDP/DDP and the optimizer; never cast the model afterwards (a 4-bit weight cannot be
    cast, and the adapters must stay fp32). With nf4 the model may still be on the CPU: each targeted
    layer then goes to `device` as it is quantized, so the device never holds the full-precision base
    whole, and `model.to(device)` afterwards moves the rest.

    The adapters' initial values depend on `seed` and their names only (adapter_initial_values): the
    same on every rank and however the model is sharded. On the meta device they are left for
    trainer/parallel/materialize.py to write.
    """
    pattern = re.compile(lora_cfg.target)
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    targets = [name for name in linears if pattern.search(name)]
    if not targets:
        raise ConfigError(
            f"lora.target={lora_cfg.target!r} matches no linear layer of this model; write a regex "
            f"over module names such as {', '.join(linears[:3])}"
        )
    if "lm_head" in targets:
        raise ConfigError(
            f"lora.target={lora_cfg.target!r} matches lm_head, which cannot carry an adapter (the "
            "fused loss reads its weight directly); exclude it, e.g. lora.target='self_attn|mlp', "
            "and set lora.train_embeddings=true to train the head itself"
        )
    target_parameters = []
    if getattr(lora_cfg, "target_parameters", ""):
        weights = expert_weight_names(model)
        target_parameters = [name for name in weights if re.search(lora_cfg.target_parameters, name)]
        if not target_parameters:
            raise ConfigError(
                f"lora.target_parameters={lora_cfg.target_parameters!r} matches no stacked expert weight of "
                + (
                    f"this model; write a regex over names such as {', '.join(weights[:2])}"
                    if weights
                    else "this model (it has no mixture-of-experts layer); set it to ''"
                )
            )
    modules_to_save = []
    if lora_cfg.train_embeddings:
        modules_to_save += ["embed_tokens"] if model.args.tie_embeddings else ["embed_tokens", "lm_head"]
    if lora_cfg.train_norms:
        modules_to_save += norm_module_names(model)
    add_adapters(
        model,
        targets,
        rank=lora_cfg.rank,
        alpha=lora_cfg.alpha,
        dropout=lora_cfg.dropout,
        quantize=lora_cfg.quantize,
        compute_dtype=compute_dtype,
        modules_to_save=modules_to_save,
        device=device,
        target_parameters=target_parameters,
        fsdp_ranks=fsdp_ranks,
    )
    with torch.no_grad():
        for _, param, values in adapter_initial_values(model, seed):
            if param.device.type != "meta":
                param.copy_(values)
    return model


def adapter_initial_values(model: nn.Module, seed: int) -> Iterator[tuple[str, nn.Parameter, torch.Tensor]]:
    """(name, parameter, its whole initial value on the CPU in fp32) for every adapter parameter:
    lora_A Kaiming-uniform as nn.Linear (PEFT's default), from a generator seeded with `seed` and the
    parameter's name; lora_B zero, so the adapted model starts as the base."""
    for name, param in model.named_parameters():
        if not is_lora_key(name):
            continue
        values = torch.zeros(param.shape)
        if name.endswith(("lora_A.weight", "lora_A")):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            nn.init.kaiming_uniform_(values, a=math.sqrt(5), generator=generator)
        yield name, param, values


def base_weight_name(name: str) -> str:
    """The name a LoRA-wrapped base weight has in the base model (and its checkpoint)."""
    return name.replace(".base_layer.", ".")


def add_adapters(
    model: nn.Module,
    targets: list[str],
    *,
    rank: int,
    alpha: float,
    dropout: float,
    quantize: str = "none",
    compute_dtype: torch.dtype = torch.float32,
    modules_to_save: Iterable[str] = (),
    device: torch.device | None = None,
    target_parameters: Iterable[str] = (),
    fsdp_ranks: int | None = None,
) -> nn.Module:
    """apply_lora with the targets named: adapters on the linear layers `targets` (full names) and
    per-expert adapters on the stacked expert weights `target_parameters` (full names); the modules
    whose names end with an entry of `modules_to_save` (PEFT's rule) stay trainable."""
    if getattr(model, "lora", None) is not None:
        raise ValueError("this model already carries LoRA adapters")
    if rank <= 0:
        raise ConfigError(f"lora.rank must be > 0 to add adapters, got {rank}")
    modules_to_save = list(modules_to_save)
    model.requires_grad_(False)
    quantized = None
    if quantize == "nf4":
        quantized = _quantizer(compute_dtype) if fsdp_ranks is None else _shardable_quantizer(fsdp_ranks)
    device = torch.device(device) if device is not None else None
    for name in targets:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, leaf)
        base = quantized(linear, device or linear.weight.device) if quantized else linear
        setattr(parent, leaf, LoraLinear(base, rank, alpha, dropout))
    target_parameters = list(target_parameters)
    for name in target_parameters:
        experts_name, _, leaf = name.rpartition(".")
        experts = model.get_submodule(experts_name)
        experts.set_adapter(leaf, ExpertLora(getattr(experts, leaf), rank, alpha))
    for entry in modules_to_save:
        matched = [(name, m) for name, m in model.named_modules(remove_duplicate=False) if name.endswith(entry)]
        unsupported = [name for name, m in matched if not _savable(m)]
        if not matched or unsupported:
            raise CheckpointError(
                f"modules_to_save entry {entry!r} names {unsupported or 'no module'}; only the "
                "embedding, the output head and the norms can be trained beside LoRA adapters"
            )
        for _, module in matched:
            module.weight.requires_grad_(True)
            if module.weight.dtype != torch.float32:
                module.weight.data = module.weight.data.float()  # .data keeps the tie of embedding and head
    model.lora = AdapterSpec(rank, alpha, dropout, quantize, list(targets), modules_to_save, target_parameters)
    return model


def norm_module_names(model: nn.Module) -> list[str]:
    """The names (last component) of the model's RMSNorm modules, in model order: what lora.train_norms
    unfreezes, as PEFT's modules_to_save names them (input_layernorm, ..., Qwen3's q_norm and k_norm)."""
    from trainer.models.llama import RMSNorm

    names = [name.rpartition(".")[2] for name, m in model.named_modules() if isinstance(m, RMSNorm)]
    return list(dict.fromkeys(names))


def _savable(module: nn.Module) -> bool:
    from trainer.models.llama import RMSNorm

    return isinstance(module, (nn.Embedding, nn.Linear, RMSNorm)) and not isinstance(module, LoraLinear)


def _quantizer(compute_dtype: torch.dtype):
    """A function turning an nn.Linear into bitsandbytes' nf4 Linear4bit (double quantization on),
    after checking once that bitsandbytes quantizes and computes on that device."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError("lora.quantize=nf4 needs the bitsandbytes package: pip install bitsandbytes") from None
    checked = set()

    def quantize(linear: nn.Linear, device: torch.device) -> nn.Module:
        q = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=True,
            quant_type="nf4",
            device="meta",
        )
        # On a CPU with AVX512-BF16, bitsandbytes repacks the 4-bit weight in place at the first no-grad
        # forward into a layout that needs out_features % 32 == 0 and that dequantize_4bit does not read
        # (the merge would then be wrong): keep the one layout training uses.
        q.support_avx512bf16_for_cpu = False
        try:
            q.weight = bnb.nn.Params4bit(
                linear.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4", module=q
            ).to(device)
            if linear.bias is not None:
                q.bias = nn.Parameter(linear.bias.data.to(device), requires_grad=False)
            if device not in checked:
                with torch.no_grad():
                    q(torch.zeros(1, linear.in_features, device=device, dtype=compute_dtype))
                checked.add(device)
        except Exception as e:  # bitsandbytes raises several kinds when a backend is missing
            dtype = str(compute_dtype).removeprefix("torch.")
            raise ConfigError(
                f"lora.quantize=nf4 needs bitsandbytes' 4-bit support on {device.type} with compute "
                f"dtype {dtype}, which bitsandbytes {bnb.__version__} does not provide here "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); install a "
                "bitsandbytes build for this device or set lora.quantize=none"
            ) from None
        return q

    return quantize


def _shardable_quantizer(ranks: int):
    """A function turning an nn.Linear into an NF4Linear (torchao) that FSDP2 can split over
    `ranks`, on the device given (quantized there), refusing one it cannot split: torchao splits the
    4-bit values, the 8-bit block scales and their factors along the rows, so each rank's rows must
    hold whole groups of 64 x 256 values."""
    try:
        import torchao.quantization  # noqa: F401
    except ImportError:
        raise ConfigError(
            "lora.quantize=nf4 under parallel.strategy=fsdp keeps the base in torchao's NF4Tensor, which "
            "FSDP2 can shard: pip install torchao (or use parallel.strategy=ddp with bitsandbytes)"
        ) from None
    group = 64 * 256  # to_nf4's default block_size x scaler_block_size

    def quantize(linear: nn.Linear, device: torch.device) -> nn.Module:
        rows, cols = linear.out_features, linear.in_features
        if rows % ranks or (rows // ranks * cols) % group:
            raise ConfigError(
                f"lora.quantize=nf4 under FSDP2 cannot split a {rows} x {cols} weight over {ranks} rank(s): "
                f"each rank's rows must hold a multiple of {group} 4-bit values (64-value blocks whose "
                "scales are quantized 256 at a time); use another number of ranks, parallel.strategy=ddp, "
                "or a lora.target that leaves it out"
            )
        return NF4Linear(linear.to(device))

    return quantize


def lora_summary(model: nn.Module) -> str:
    """One line for the run's start message: rank, where, and how many parameters train."""
    spec = model.lora
    total = parameter_count(model.parameters())
    trainable = parameter_count(p for p in model.parameters() if p.requires_grad)
    extra = f", {', '.join(spec.modules_to_save)} unfrozen" if spec.modules_to_save else ""
    base = "4-bit nf4 base" if spec.quantize == "nf4" else "frozen base"
    return (
        f"LoRA rank {spec.rank}, alpha {spec.alpha:g} on {len(spec.targets)} linear layers"
        + (f" and {len(spec.target_parameters)} stacked expert weights" if spec.target_parameters else "")
        + f" ({base}{extra}): "
        f"{trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters train ({100 * trainable / total:.2f}%)"
    )


# ---------------------------------------------------------------- checkpoints


def is_lora_key(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or name.endswith((".lora_A", ".lora_B"))


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a LoRA checkpoint holds: every parameter that trains (adapters and what
    train_embeddings / train_norms unfroze), by our names; a tied embedding appears once."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def check_checkpoint_kind(names: Iterable[str], model: nn.Module, source: str) -> None:
    """Refuses a full-model checkpoint in a LoRA run and a LoRA checkpoint in a full run."""
    saved_lora = any(is_lora_key(name) for name in names)
    spec = getattr(model, "lora", None)
    if saved_lora and spec is None:
        raise CheckpointError(
            f"checkpoint {source} holds LoRA adapters, but this run trains the full model "
            "(lora.rank=0); resume it with the lora.* settings it was trained with (its "
            "config.toml), or train its merged model (final/merged) with model.from_hf"
        )
    if spec is not None and not saved_lora:
        raise CheckpointError(
            f"checkpoint {source} holds a full model, but this run trains LoRA adapters "
            f"(lora.rank={spec.rank}); resume it with lora.rank=0, or start a new LoRA run "
            f"from it with --model.from_hf={source}"
        )


def load_trainable_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copies `state` (from trainable_state_dict) into `model`'s trainable parameters, refusing a
    checkpoint of the other kind or of other LoRA settings with the mismatch named."""
    check_checkpoint_kind(state.keys(), model, source)
    own = dict(model.named_parameters())
    trainable = {name for name, p in own.items() if p.requires_grad}
    missing, unexpected = sorted(trainable - set(state)), sorted(set(state) - trainable)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {source} does not fit this run's LoRA settings: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}; resume with the lora.* settings it was saved with"
        )
    for name, tensor in state.items():
        if tensor.shape != own[name].shape:
            raise CheckpointError(
                f"checkpoint {source} does not fit this run's LoRA settings: {name} is "
                f"{tuple(tensor.shape)} there but {tuple(own[name].shape)} here (another lora.rank?)"
            )
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor)


# ---------------------------------------------------------------- PEFT's format


def save_adapter(
    model: nn.Module, folder: str | Path, base_model_path: str | Path, state: dict[str, torch.Tensor] | None = None
) -> None:
    """Writes the adapters in PEFT's format: adapter_config.json (peft_type LORA, task_type
    CAUSAL_LM, r, lora_alpha, lora_dropout, target_modules, modules_to_save, base_model_name_or_path)
    and adapter_model.safetensors under PEFT's key names. `state`: the trainable tensors by our names
    when the caller gathered them (e.g. from FSDP shards); default trainable_state_dict(model)."""
    import peft

    spec: AdapterSpec = model.lora
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = trainable_state_dict(model) if state is None else state
    peft_names = peft_expert_keys(spec)
    tensors = {PEFT_PREFIX + peft_names.get(name, name): t.detach().cpu().contiguous() for name, t in state.items()}
    tied = model.args.tie_embeddings and "embed_tokens" in spec.modules_to_save
    if tied:  # PEFT saves the tied head under its own name too (a copy: safetensors refuses shared memory)
        tensors[PEFT_PREFIX + "lm_head.weight"] = tensors[PEFT_PREFIX + "model.embed_tokens.weight"].clone()
    base = Path(base_model_path)
    config = peft.LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=peft_target_modules(model),
        target_parameters=peft_target_parameters(model) or None,
        modules_to_save=spec.modules_to_save or None,
        task_type="CAUSAL_LM",
        bias="none",
        inference_mode=True,
        base_model_name_or_path=str(base.resolve()) if base.is_dir() else str(base_model_path),
        ensure_weight_tying=tied,
    )
    config.save_pretrained(str(folder))
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    follow_umask(folder / ADAPTER_WEIGHTS)


def peft_target_modules(model: nn.Module) -> list[str]:
    """target_modules for adapter_config.json: the layers' short names (q_proj, ...) when they pick
    out exactly the adapted layers, else their full names (PEFT matches either)."""
    targets = set(model.lora.targets)
    leaves = {name.rpartition(".")[2] for name in targets}
    by_leaf = {
        name
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, LoraLinear)) and name.rpartition(".")[2] in leaves
    }
    return sorted(leaves) if by_leaf == targets else sorted(targets)


def peft_target_parameters(model: nn.Module) -> list[str]:
    """target_parameters for adapter_config.json: "mlp.experts.<weight>" when every MoE layer's
    weight is adapted, else the full names."""

    def short(name: str) -> str:
        return "mlp." + name.split(".mlp.", 1)[1]

    targets = set(model.lora.target_parameters)
    shorts = {short(name) for name in targets}
    covered = {name for name in expert_weight_names(model) if short(name) in shorts}
    return sorted(shorts) if covered == targets else sorted(targets)


def peft_expert_keys(spec: AdapterSpec) -> dict[str, str]:
    """Our names of the expert adapters -> PEFT's. PEFT wraps each targeted parameter of a module in
    one more ParamWrapper, the first in the module's parameter order innermost: with both weights
    adapted, gate_up_proj's adapters sit under `experts.base_layer.` and down_proj's under `experts.`."""
    from trainer.models.moe import Experts

    by_module: dict[str, list[str]] = {}
    for name in spec.target_parameters:
        module, _, leaf = name.rpartition(".")
        by_module.setdefault(module, []).append(leaf)
    keys = {}
    for module, leaves in by_module.items():
        ordered = [leaf for leaf in Experts.ADAPTABLE if leaf in leaves]
        for depth, leaf in enumerate(ordered):
            wrapper = "base_layer." * (len(ordered) - 1 - depth)
            for part in ("lora_A", "lora_B"):
                keys[f"{module}.{leaf}_lora.{part}"] = f"{module}.{wrapper}{part}.weight"
    return keys


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(folder: str | Path) -> dict:
    """adapter_config.json, refused unless it is a LoRA adapter this trainer computes the same way."""
    folder = Path(folder)
    if not is_adapter_folder(folder):
        raise CheckpointError(f"{str(folder)!r} has no {ADAPTER_CONFIG}: expected a LoRA adapter folder")
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{folder} holds a {config.get('peft_type')} adapter; only LORA adapters are supported")
    used = [key for key in UNSUPPORTED_PEFT_OPTIONS if config.get(key)]
    if config.get("bias", "none") != "none":
        used.append(f"bias={config['bias']}")
    if used:
        raise CheckpointError(
            f"{folder}: the adapter uses {', '.join(used)}, which this trainer does not load; "
            "merge it with PEFT (merge_and_unload) and load the merged model instead"
        )
    return config


def load_adapter_model(
    folder: str | Path,
    kernels=None,
    quantize: str = "none",
    compute_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    fsdp: bool = False,
) -> nn.Module:
    """The base model of a PEFT LoRA folder (its base_model_name_or_path, loaded with load_hf) with
    the folder's adapters applied, in eval mode on `device`. `quantize`: "nf4" to rebuild a QLoRA
    run's 4-bit base (quantizing the same weights on the same kind of device gives the same 4-bit
    weights), each targeted layer on its way to `device`, with torchao as the run did if it trained
    under parallel.strategy=fsdp (`fsdp`), else with bitsandbytes."""
    from trainer.models import load_hf

    folder = Path(folder)
    config = read_adapter_config(folder)
    base = config.get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise CheckpointError(
            f"{folder} is a LoRA adapter of the base model {base!r}, which is not a folder here; "
            f"put the base model there (adapter_config.json's base_model_name_or_path names it)"
            + (f", or use the merged model {folder / 'merged'}" if (folder / "merged").is_dir() else "")
        )
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"{folder} has no {ADAPTER_WEIGHTS}")
    model = load_hf(base, kernels)
    if quantize != "nf4":  # a 4-bit base is quantized layer by layer on its way to the device
        model.to(device)
    targets = _peft_targets(model, config.get("target_modules"), folder)
    target_parameters = _peft_target_parameters(model, config.get("target_parameters"), folder)
    add_adapters(
        model,
        targets,
        rank=config["r"],
        alpha=config["lora_alpha"],
        dropout=config.get("lora_dropout", 0.0),
        quantize=quantize,
        compute_dtype=compute_dtype,
        modules_to_save=config.get("modules_to_save") or (),
        device=device,
        target_parameters=target_parameters,
        fsdp_ranks=1 if fsdp else None,
    )
    load_adapter_weights(model, folder)
    return model.to(device).eval()


def load_adapter_weights(model: nn.Module, folder: str | Path) -> None:
    """Loads a save_adapter folder's adapter_model.safetensors into `model` (which carries the same
    adapters), e.g. to resume from a checkpoint written with save_adapter. Refused as
    load_trainable_state_dict refuses a mismatch."""
    folder = Path(folder)
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"{folder} has no {ADAPTER_WEIGHTS}")
    state = {}
    for key, tensor in load_file(str(folder / ADAPTER_WEIGHTS), device=str(next(model.parameters()).device)).items():
        if not key.startswith(PEFT_PREFIX):
            raise CheckpointError(
                f"{folder}/{ADAPTER_WEIGHTS} holds {key!r}, not a key of a causal-LM adapter "
                f"(they start with {PEFT_PREFIX!r})"
            )
        state[key.removeprefix(PEFT_PREFIX)] = tensor
    ours = {peft: name for name, peft in peft_expert_keys(model.lora).items()}
    state = {ours.get(key, key): tensor for key, tensor in state.items()}
    if model.args.tie_embeddings:
        state.pop("lm_head.weight", None)  # the tied head is the embedding
    load_trainable_state_dict(model, state, str(folder))


def _peft_target_parameters(model: nn.Module, target_parameters, folder: Path) -> list[str]:
    """The stacked expert weights PEFT's target_parameters select (names matched exactly or as a
    dotted suffix)."""
    wanted = list(target_parameters or [])
    if not wanted:
        return []
    weights = expert_weight_names(model)
    targets = [name for name in weights if name in wanted or any(name.endswith("." + t) for t in wanted)]
    if not targets:
        raise CheckpointError(
            f"{folder}: target_parameters={wanted!r} matches no stacked expert weight of its base model"
        )
    return targets


def _peft_targets(model: nn.Module, target_modules, folder: Path) -> list[str]:
    """The linear layers PEFT's target_modules select: a regex matched in full, or names matched
    exactly or as a dotted suffix."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if isinstance(target_modules, str):
        targets = [name for name in linears if re.fullmatch(target_modules, name)]
    else:
        wanted = list(target_modules or [])
        targets = [name for name in linears if name in wanted or any(name.endswith("." + t) for t in wanted)]
    if not targets:
        raise CheckpointError(f"{folder}: target_modules={target_modules!r} matches no linear layer of its base model")
    return targets


# ---------------------------------------------------------------- merging


def merge_state_dict(
    state: dict[str, torch.Tensor], scaling: float, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """A LoRA model's state (our names; base weights dense or torchao NF4Tensors) -> the plain model's state:
    X.weight = X.base_layer.weight + scaling * X.lora_B.weight @ X.lora_A.weight, computed in fp32
    on the tensors' device, then cast to `dtype` (default: each base weight's) and moved to `device`."""
    merged = {}
    for key, tensor in state.items():
        if is_lora_key(key):
            continue
        tensor = dense(tensor)
        if f"{key}_lora.lora_A" in state:  # a stacked expert weight (experts, out, in) with ExpertLora adapters
            a, b = state[f"{key}_lora.lora_A"].float(), state[f"{key}_lora.lora_B"].float()
            experts = tensor.shape[0]
            rank = a.shape[0] // experts
            delta = torch.bmm(b.view(b.shape[0], rank, experts).permute(2, 0, 1), a.view(experts, rank, -1))
            tensor = (tensor.float() + scaling * delta.to(tensor.device)).to(tensor.dtype)
            merged[key] = tensor.detach().to(device, dtype or tensor.dtype)
            continue
        prefix, marker, leaf = key.partition(".base_layer.")
        if marker and leaf == "weight":
            a, b = state[f"{prefix}.lora_A.weight"], state[f"{prefix}.lora_B.weight"]
            tensor = (
                tensor.float()
                .addmm(b.to(tensor.device, torch.float32), a.to(tensor.device, torch.float32), alpha=scaling)
                .to(tensor.dtype)
            )
        merged[prefix + "." + leaf if marker else key] = tensor.detach().to(device, dtype or tensor.dtype)
    return merged


def merged_state_dict(
    model: nn.Module, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """The plain model's weights with every adapter merged in (nf4 bases dequantized first), in
    `dtype` (default: the base weights' dtype) on `device`."""
    state = {name: p for name, p in model.named_parameters()}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            state[f"{name}.base_layer.weight"] = module.dense_base_weight()
    dtype = dtype or base_dtype(model)
    return merge_state_dict(state, model.lora.scaling, dtype, device)


def base_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the frozen base weights (a 4-bit weight's original dtype)."""
    module = next(m for m in model.modules() if isinstance(m, LoraLinear))
    quant_state = getattr(module.base_layer.weight, "quant_state", None)
    return quant_state.dtype if quant_state is not None else module.base_layer.weight.dtype


def merged_model(model: nn.Module, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """A plain Transformer (no adapters) with the merged weights, for trainer.models.save_hf: on
    `device` (the CPU by default, so a GPU run needs no second copy there), in the base weights'
    dtype unless `dtype` is given. Tensors that merging leaves unchanged may share memory with `model`."""
    from trainer.models import KernelChoice, Transformer

    state = merged_state_dict(model, dtype, device)
    with torch.device("meta"):
        plain = Transformer(model.args, KernelChoice())
    for name, tensor in state.items():
        module_name, _, leaf = name.rpartition(".")
        setattr(plain.get_submodule(module_name), leaf, nn.Parameter(tensor, requires_grad=False))
    plain.materialize_rotary(device)
    plain.tie_weights()
    plain.hf_config, plain.hf_generation_config = model.hf_config, model.hf_generation_config
    return plain.eval()
