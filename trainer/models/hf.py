"""Hugging Face checkpoint folders: config.json + safetensors (single file or sharded with an index).

Every family shares one decoder; config.json's keys that every family has are mapped here, each
family's own in trainer/models/families (Qwen2's q/k/v bias, Qwen3's q/k norms, sliding windows).
Loading streams the tensors one at a time into a model built on the meta device, so a checkpoint
never sits in memory twice.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from trainer.errors import CheckpointError
from trainer.files import follow_umask
from trainer.models.config import ModelArgs
from trainer.models.families import BY_NAME, family_of_config

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_FILE = "generation_config.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' default shard size


def _rope(cfg: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from transformers 5's `rope_parameters` or 4's `rope_scaling`."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if "full_attention" in params:  # per layer type (Gemma 3): the global layers' here, the family reads the rest
        params = dict(params["full_attention"])
    params.pop("partial_rotary_factor", None)  # read by _rotary_dim
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(
            f"rope scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return theta, None
    scaling = {"rope_type": rope_type, **params}
    if rope_type == "llama3" and "original_max_position_embeddings" not in scaling:
        scaling["original_max_position_embeddings"] = cfg["max_position_embeddings"]
    return theta, scaling


def _rotary_dim(cfg: dict, head_dim: int) -> int | None:
    """The rotated part of each head (Phi-3's partial_rotary_factor); None: all of it."""
    factor = (cfg.get("rope_parameters") or {}).get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    return None if factor == 1.0 else int(head_dim * factor)


def args_from_hf_config(cfg: dict) -> ModelArgs:
    """ModelArgs of a config.json: the keys every family shares here, the family's own in its file."""
    family = family_of_config(cfg)
    rope_theta, rope_scaling = _rope(cfg)
    n_heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
    shared = dict(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        head_dim=head_dim,
        rotary_dim=_rotary_dim(cfg, head_dim),
        max_seq_len=cfg.get("max_position_embeddings", 2048),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        padding_idx=pad if isinstance(pad := cfg.get("pad_token_id"), int) and 0 <= pad < cfg["vocab_size"] else None,
        family=family.name,
    )
    return ModelArgs(**{**shared, **family.args_from_config(cfg)})


def hf_config_from_args(
    args: ModelArgs,
    dtype: torch.dtype = torch.float32,
    source: dict | None = None,
    special_tokens: dict[str, int | None] | None = None,
) -> dict:
    """config.json for `args`; keys of the `source` config it was loaded from are kept, and the
    tokenizer's `special_tokens` (Tokenizer.special_token_ids) set the token ids."""
    family = BY_NAME[args.family]
    cfg = {k: v for k, v in (source or {}).items() if k not in ("rope_parameters", "rope_scaling")}
    cfg.update(
        {
            "architectures": [family.architecture],
            "model_type": family.model_type,
            "vocab_size": args.vocab_size,
            "hidden_size": args.hidden_size,
            "intermediate_size": args.intermediate_size,
            "num_hidden_layers": args.n_layers,
            "num_attention_heads": args.n_heads,
            "num_key_value_heads": args.n_kv_heads,
            "head_dim": args.head_dim,
            "max_position_embeddings": args.max_seq_len,
            "rope_theta": args.rope_theta,
            "rms_norm_eps": args.norm_eps,
            "tie_word_embeddings": args.tie_embeddings,
            "torch_dtype": _DTYPE_NAMES[dtype],
            "dtype": _DTYPE_NAMES[dtype],  # transformers 5 renamed torch_dtype
        }
    )
    if args.rope_scaling:
        cfg["rope_scaling"] = dict(args.rope_scaling)
    if args.rotary_dim is not None:
        cfg["partial_rotary_factor"] = args.rotary_dim / args.head_dim
    cfg.update(family.config_from_args(args))
    return with_token_ids(cfg, special_tokens or {})


def with_token_ids(cfg: dict, special_tokens: dict[str, int | None]) -> dict:
    """`cfg` with the tokenizer's bos/eos/pad ids. Every key is written, None included: a config
    without them gets the class defaults (Llama's eos 2, bos 1: other tokens of our tokenizers).
    A source id list that holds the tokenizer's id stays (an instruct model's several end tokens),
    and a source id stays where the tokenizer names no such token."""
    cfg = dict(cfg)
    for key, value in special_tokens.items():
        kept = cfg.get(key)
        if value is None and kept is not None:
            continue
        if isinstance(kept, list) and value in kept:
            continue
        cfg[key] = value
    return cfg


def generation_config(config: dict, source: dict | None = None) -> dict:
    """generation_config.json: the `source` folder's (sampling defaults) with config.json's token ids;
    padding with EOS when there is no pad token, as transformers' generate would (with a warning)."""
    ids = {k: config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if ids["pad_token_id"] is None:
        eos = ids["eos_token_id"]
        ids["pad_token_id"] = eos[0] if isinstance(eos, list) else eos
    return {**(source or {}), **ids}


def save_hf(
    model,
    path: str | Path,
    special_tokens: dict[str, int | None] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Writes config.json, generation_config.json and the weights in the layout `transformers` loads:
    model.safetensors, or model-0000i-of-0000n.safetensors shards plus an index when they exceed
    `max_shard_bytes`. `special_tokens`: the tokenizer's ids (Tokenizer.special_token_ids), so that
    generate stops at its EOS; the source checkpoint's otherwise."""
    state = model.state_dict()
    write_hf(model, path, state, lambda names: {name: state[name] for name in names}, special_tokens, max_shard_bytes)


def write_hf(
    model,
    path: str | Path,
    layout: Mapping[str, torch.Tensor],
    fetch: Callable[[list[str]], dict[str, torch.Tensor]],
    special_tokens: dict[str, int | None] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """save_hf with the weights fetched one file at a time, for a model that is never whole in one
    place (trainer/checkpoint.py: gathered from FSDP/TP shards, or read back from DCP's).

    `layout`: our tensor names in the state dict's order, each with a tensor of its global shape and
    dtype (the tensor itself, a DTensor or a meta tensor; nothing is read from it). `fetch(names)`
    returns those tensors whole; it is called before each file for the tensors that file needs and
    no earlier file fetched, so the calls name the layout's tensors in order, each once. `model` gives
    the rest: args, hf_config and hf_generation_config. A tensor fetched is kept until its last
    checkpoint tensor is written: at most one file's worth, plus the rest of a stacked-expert tensor
    whose experts straddle two files.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for stale in list(path.glob("model*.safetensors")) + [path / INDEX_FILE]:
        stale.unlink(missing_ok=True)  # a previous save's files would shadow this one
    args = model.args
    names = exported_names(args, layout)
    metas = {name: torch.empty(layout[name].shape, dtype=layout[name].dtype, device="meta") for name in names}
    files = _plan_files(args, metas, max_shard_bytes)
    file_names = (
        [SINGLE_FILE]
        if len(files) == 1
        else [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    )
    parts_left = Counter(ours for file in files for _, _, ours in file)
    held: dict[str, torch.Tensor] = {}
    weight_map = {}
    for file_name, file in zip(file_names, files):
        owners = list(dict.fromkeys(ours for _, _, ours in file))
        needed = [ours for ours in owners if ours not in held]
        if needed:  # none where a file holds only more experts of a stacked tensor already fetched
            held.update(fetch(needed))
        pieces = {}
        for ours in owners:
            pieces.update(checkpoint_state(args, {ours: held[ours]}))
        # One file at a time on the host: a GPU model never needs a whole CPU copy.
        tensors = {theirs: pieces[theirs].detach().contiguous().cpu() for theirs, _, _ in file}
        del pieces
        save_file(tensors, str(path / file_name), metadata={"format": "pt"})
        del tensors  # before the next fetch, so two files' worth are never held
        follow_umask(path / file_name)
        weight_map.update({theirs: file_name for theirs, _, _ in file})
        for _, _, ours in file:
            parts_left[ours] -= 1
            if not parts_left[ours]:
                del held[ours]
    if len(files) > 1:
        total = sum(size for file in files for _, size, _ in file)
        (path / INDEX_FILE).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
        )
    dtype = metas[names[0]].dtype
    config = hf_config_from_args(args, dtype, model.hf_config, special_tokens)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = generation_config(config, model.hf_generation_config)
    (path / GENERATION_FILE).write_text(json.dumps(generation, indent=2) + "\n")


def exported_names(args: ModelArgs, names: Iterable[str]) -> list[str]:
    """The tensors of a state dict that write_hf fetches, in the order it fetches them: all but a
    tied head, which transformers re-ties from the embedding (so it is not gathered either)."""
    return [name for name in names if not (args.tie_embeddings and name == "lm_head.weight")]


def _plan_files(
    args: ModelArgs, metas: dict[str, torch.Tensor], max_shard_bytes: int
) -> list[list[tuple[str, int, str]]]:
    """The files of an export: each a list of (checkpoint name, bytes, our name), in order, a new file
    begun where the next tensor would take the current one past `max_shard_bytes`. Worked out on meta
    tensors, so no weight is needed to know where each one goes."""
    files: list[list[tuple[str, int, str]]] = [[]]
    size = 0
    for ours, meta in metas.items():
        for theirs, piece in checkpoint_state(args, {ours: meta}).items():
            nbytes = piece.numel() * piece.element_size()
            if files[-1] and size + nbytes > max_shard_bytes:
                files.append([])
                size = 0
            files[-1].append((theirs, nbytes, ours))
            size += nbytes
    return files


def read_generation_config(path: str | Path) -> dict | None:
    file = Path(path) / GENERATION_FILE
    return json.loads(file.read_text()) if file.is_file() else None


def read_hf_config(path: str | Path) -> dict:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{str(path)!r} has no config.json: expected a Hugging Face model folder")
    return json.loads(file.read_text())


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a folder: the shards its index names, or model.safetensors."""
    path = Path(path)
    if (path / INDEX_FILE).is_file():
        return [path / f for f in sorted(set(json.loads((path / INDEX_FILE).read_text())["weight_map"].values()))]
    if not (path / SINGLE_FILE).is_file():
        raise CheckpointError(f"{str(path)!r} holds no {SINGLE_FILE} (nor a sharded {INDEX_FILE})")
    return [path / SINGLE_FILE]


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    state = {}
    for file in weight_files(path):
        state.update(load_file(str(file)))
    return state


def _skipped(name: str, model) -> bool:
    # Old checkpoints store the rotary table (recomputed here); a tied head is the embedding.
    return name.endswith("rotary_emb.inv_freq") or (model.args.tie_embeddings and name == "lm_head.weight")


def expert_sources(args: ModelArgs) -> dict[str, list[str]]:
    """The state-dict adapter of a mixture-of-experts family: each of our tensors that a checkpoint
    stores differently -> the checkpoint tensors it is made of (trainer.models.moe stacks the
    experts; the family's ExpertLayout says how the checkpoint names them)."""
    layout = BY_NAME[args.family].experts
    if layout is None:
        return {}
    sources = {}
    for i in range(args.n_layers):
        if not args.is_moe_layer(i):
            continue
        ours, theirs = f"model.layers.{i}.mlp.", f"model.layers.{i}.{layout.block}."
        expert = [f"{theirs}experts.{e}." for e in range(args.n_experts)]
        sources[ours + "gate.weight"] = [theirs + "gate.weight"]
        sources[ours + "experts.gate_up_proj"] = [f"{x}{layout.gate}.weight" for x in expert] + [
            f"{x}{layout.up}.weight" for x in expert
        ]
        sources[ours + "experts.down_proj"] = [f"{x}{layout.down}.weight" for x in expert]
    return sources


def _join(name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Our tensor `name` from its checkpoint tensors (expert_sources' order), written straight into
    one new tensor (no per-expert intermediate: the allocator would keep their memory)."""
    if name.endswith("experts.gate_up_proj"):  # each expert's gate rows, then its up rows
        n = len(tensors) // 2
        rows = tensors[0].shape[0]
        out = tensors[0].new_empty(n, 2 * rows, tensors[0].shape[1])
        for e in range(n):
            out[e, :rows] = tensors[e]
            out[e, rows:] = tensors[n + e]
        return out
    if name.endswith("experts.down_proj"):
        out = tensors[0].new_empty(len(tensors), *tensors[0].shape)
        for e, tensor in enumerate(tensors):
            out[e] = tensor
        return out
    return tensors[0]


def _split(name: str, tensor: torch.Tensor) -> list[torch.Tensor]:
    """The inverse of _join."""
    if name.endswith("experts.gate_up_proj"):
        gate, up = tensor.chunk(2, dim=1)
        return list(gate.unbind(0)) + list(up.unbind(0))
    if name.endswith("experts.down_proj"):
        return list(tensor.unbind(0))
    return [tensor]


def checkpoint_state(args: ModelArgs, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict under the checkpoint's names and layout (the family's transformers class)."""
    sources = expert_sources(args)
    out = {}
    for name, tensor in state.items():
        out.update(zip(sources.get(name, [name]), _split(name, tensor) if name in sources else [tensor]))
    return out


def model_state(args: ModelArgs, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict under our names and layout (the inverse of checkpoint_state); a
    tensor the adapter expects but the checkpoint lacks stays out, for load_weights to name."""
    sources = expert_sources(args)
    used = {n for names in sources.values() for n in names}
    out = {name: t for name, t in state.items() if name not in used}
    for name, names in sources.items():
        if all(n in state for n in names):
            out[name] = _join(name, [state[n] for n in names])
    return out


def assign_weights(model, path: str | Path) -> None:
    """Fills a model built on the meta device from a folder's safetensors, one tensor at a time.

    Each tensor read becomes the parameter itself (in the checkpoint's dtype), so memory holds at
    most one copy of the weights (an MoE layer's experts: their checkpoint tensors and the stack).
    Checkpoints of another shape are refused with the mismatch named.
    """
    own = {name: p for name, p in model.named_parameters(remove_duplicate=False) if not _skipped(name, model)}
    sources = expert_sources(model.args)
    with ExitStack() as files:
        where = {}
        for file in weight_files(path):
            handle = files.enter_context(safe_open(str(file), framework="pt"))
            where.update({name: handle for name in handle.keys() if not _skipped(name, model)})
        expected = {n for name in own for n in sources.get(name, [name])}
        unexpected = sorted(set(where) - expected)
        if unexpected:
            raise CheckpointError(f"checkpoint {path} does not fit this model: unexpected tensor {unexpected[0]}")
        missing = sorted(n for n in expected if n not in where)
        if missing:
            raise CheckpointError(
                f"checkpoint {path} does not fit this model: missing {missing[:3]}"
                + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            )
        for name, param in own.items():
            names = sources.get(name, [name])
            tensor = (
                _join(name, [where[n].get_tensor(n) for n in names])
                if name in sources
                else where[name].get_tensor(name)
            )
            if tensor.shape != param.shape:
                raise CheckpointError(
                    f"checkpoint {path} does not fit this model: {names[0]} is "
                    f"{tuple(tensor.shape)} there but {tuple(param.shape)} here"
                )
            module_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(module_name), leaf, nn.Parameter(tensor))


def load_weights(model, state: dict[str, torch.Tensor], source: str) -> None:
    """Copies `state` into `model`, refusing a checkpoint of another shape with the mismatch named."""
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not _skipped(k, model)}
    if model.args.tie_embeddings:
        own.pop("lm_head.weight", None)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {source} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for name, tensor in state.items():
        if tensor.shape != own[name].shape:
            raise CheckpointError(
                f"checkpoint {source} does not fit this model: {name} is "
                f"{tuple(tensor.shape)} there but {tuple(own[name].shape)} here"
            )
    model.load_state_dict(state, strict=False)
