"""The model's shape and parameters, from the configuration alone: no weights, no data, no training.

The parameters come from the model class itself built on the meta device (no memory), so their
names, shapes and ties are exactly the ones the optimizer will see.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from trainer.errors import ConfigError
from trainer.models.config import PRESETS, ModelArgs, resolve_args


@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[int, ...]
    targeted: bool  # an nn.Linear weight optim.galore_target / optim.apollo_target matches
    group: str  # "decay", "no_decay" or "targeted": the optimizer param group (trainer.optim.param_groups)
    trainable: bool = True  # False: a base weight LoRA freezes (no gradient, no optimizer state)
    itemsize: int = 0  # bytes per value; 0: train.param_dtype's (LoRA adapters are fp32); nf4: see nbytes
    nf4: bool = False  # a frozen base weight lora.quantize=nf4 stores in 4 bits

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def nbytes(self, param_bytes: int) -> int:
        if self.nf4:  # nf4 with double quantization: 4 bits, an 8-bit absmax per 64 values and an fp32 factor
            # per 256 of those (bitsandbytes; torchao's factor is in the weight's dtype, 0.01% less for bf16)
            return self.numel // 2 + self.numel // 64 + self.numel // (64 * 256) * 4
        return self.numel * (self.itemsize or param_bytes)


def tokenizer_vocab(config) -> int:
    """The vocabulary the run's tokenizer will have (an upper bound for a BPE not trained yet)."""
    d = config.data
    spec = d.tokenizer
    if config.model.from_hf and spec == "bpe" and (Path(config.model.from_hf) / "tokenizer.json").is_file():
        spec = config.model.from_hf
    if spec == "byte":
        return 257
    if spec == "bpe":
        return d.vocab_size  # trained on the corpus to at most this many tokens
    from trainer.data import build_tokenizer

    return build_tokenizer(spec).vocab_size


def model_args(config) -> ModelArgs:
    """ModelArgs of the configured model, as the Trainer will build it."""
    m = config.model
    if m.from_hf:
        from trainer.models.hf import args_from_hf_config, read_hf_config

        if not Path(m.from_hf).is_dir():
            raise ConfigError(f"model.from_hf={m.from_hf!r} is not a folder")
        return args_from_hf_config(read_hf_config(m.from_hf))
    if m.preset not in PRESETS:
        raise ConfigError(f"model.preset={m.preset!r} is unknown; choose one of: {', '.join(PRESETS)}")
    vocab = tokenizer_vocab(config) if PRESETS[m.preset]["vocab_size"] is None and m.vocab_size is None else None
    try:
        return resolve_args(
            m.preset,
            vocab,
            vocab_size=m.vocab_size,
            hidden_size=m.hidden_size,
            intermediate_size=m.intermediate_size,
            n_layers=m.n_layers,
            n_heads=m.n_heads,
            n_kv_heads=m.n_kv_heads,
            max_seq_len=m.max_seq_len,
            rope_theta=m.rope_theta,
            tie_embeddings=m.tie_embeddings,
            qkv_bias=m.qkv_bias,
        )
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


def parameters(args: ModelArgs, target: str | None = None, lora=None) -> list[Param]:
    """Every parameter once (tied weights once), in the model's order, with its optimizer group;
    with `lora` (the [lora] section, rank > 0) the adapters as trainer.lora adds them."""
    from trainer.models.llama import Transformer

    with torch.device("meta"):
        model = Transformer(args)
    quantized = set()
    if lora is not None and lora.rank > 0:
        from trainer.lora import apply_lora

        plain = copy.copy(lora)
        plain.quantize = "none"  # the adapters and what trains are the same; only the base's storage differs
        apply_lora(model, plain)
        if lora.quantize == "nf4":
            quantized = {id(m.base_layer.weight) for m in model.modules() if hasattr(m, "base_layer")}
    targeted = set()
    if target is not None:
        pattern = re.compile(target)
        targeted = {
            id(m.weight) for name, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.search(name)
        }
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    out = []
    for name, p in model.named_parameters():  # shared parameters are listed once
        if p.dim() < 2 or id(p) in embeddings:
            group = "no_decay"
        else:
            group = "targeted" if id(p) in targeted else "decay"
        adapter = ".lora_A." in name or ".lora_B." in name
        # trainer.lora keeps adapters and the modules it trains (embeddings, norms) in fp32
        itemsize = 4 if lora is not None and lora.rank > 0 and p.requires_grad else 0
        out.append(
            Param(
                name,
                tuple(p.shape),
                id(p) in targeted,
                group,
                trainable=p.requires_grad,
                itemsize=4 if adapter else itemsize,
                nf4=id(p) in quantized,
            )
        )
    return out


def lm_head_name(args: ModelArgs) -> str:
    return "model.embed_tokens.weight" if args.tie_embeddings else "lm_head.weight"
