"""Checkpoints: written to a temporary folder and renamed into place, rotated, resumed.

A checkpoint folder `checkpoint-<step>` holds the model as a Hugging Face folder (config.json +
model.safetensors), the tokenizer, the run's config, and the training state: optimizer, scheduler,
scaler, RNG states, the data sampler's position and the trainer state. A sharded (FSDP) run adds
`distributed/`: its model and optimizer shards, written by every rank through DCP, and writes its
model.safetensors a file at a time (no rank ever holds the whole model). `trainer_state.json` is
written last, and the folder only gets its final name once everything in it is on disk, so a crash
mid-save never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import shutil
import threading
import zipfile
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open

from trainer.errors import CheckpointError
from trainer.lora import (
    ADAPTER_WEIGHTS,
    base_dtype,
    check_checkpoint_kind,
    is_adapter_folder,
    is_lora_key,
    load_adapter_weights,
    merge_state_dict,
    merged_model,
    save_adapter,
)
from trainer.models.hf import (
    DEFAULT_MAX_SHARD_BYTES,
    args_from_hf_config,
    exported_names,
    load_state_dict,
    load_weights,
    model_state,
    read_hf_config,
    save_hf,
    weight_files,
    write_hf,
)
from trainer.models.nf4 import dense
from trainer.parallel.distributed import barrier
from trainer.parallel.sharded_checkpoint import (
    gather_tensors,
    load_full_state,
    load_sharded,
    read_model_tensors,
    save_sharded,
    save_sharded_async,
)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
SHARDED_DIR = "distributed"  # DCP shards of the model and optimizer, in checkpoints of sharded runs
# The largest safetensors file of a checkpoint's or final/'s model (a bigger one is split, with an
# index), and so about the most of the model a sharded run's rank 0 holds while it writes them.
MAX_SHARD_BYTES = DEFAULT_MAX_SHARD_BYTES


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = checkpoint_dirs(output_dir)
    return found[-1] if found else None


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": json.dumps(random.getstate()),
        "numpy": json.dumps([np_state[0], np_state[1].tolist(), *np_state[2:]]),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = json.loads(state["numpy"])
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    model,
    optimizer,
    scheduler,
    scaler,
    trainer_state: dict,
    sampler_state: dict,
    config_toml: str,
    tokenizer,
    sharded: bool = False,
    is_main: bool = True,
    lora_base: str | None = None,
    readme: str | None = None,
) -> Path:
    """Writes checkpoint-<step>; with `sharded` (an FSDP or tensor-parallel run) every rank must call it.

    A sharded checkpoint also holds the model and optimizer shards in `distributed/` (DCP); its
    model.safetensors (or model-0000i-of-0000n files) holds the whole model, gathered a tensor at a
    time and written by rank 0 a file at a time, so `eval` reads it like any other.
    A LoRA run's checkpoint holds only what trains: the adapters in PEFT's format (of the base
    model `lora_base`), and the optimizer state of those tensors.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    # Ranks must agree on the temporary folder, so a sharded save cannot name it by process id.
    tmp = output_dir / (f".tmp-checkpoint-{step}" if sharded else f".tmp-checkpoint-{step}-{os.getpid()}")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if sharded:
        barrier()  # the folder exists before any rank writes into it
        save_sharded(tmp / SHARDED_DIR, model, optimizer, trainable_only=is_lora(model))
    write_model = model_writer(model, sharded, lora_base, tokenizer.special_token_ids(), is_main)
    if is_main:
        _write_checkpoint(
            tmp,
            final,
            write_model,
            training_state=training_state(None if sharded else optimizer, scheduler, scaler),
            trainer_state=trainer_state,
            sampler_state=sampler_state,
            config_toml=config_toml,
            tokenizer=tokenizer,
            readme=readme,
        )
    elif sharded:
        write_model(tmp)  # collective: the gathers rank 0's write_model makes
    if sharded:
        barrier()  # no rank moves on (or rotates, or saves again) before the rename
    return final


def training_state(optimizer, scheduler, scaler, copy: bool = False) -> dict:
    """training_state.pt's content: the optimizer (None: in distributed/), scheduler, scaler and RNG
    states; `copy`: every tensor copied to host memory, so training may go on while it is written."""
    state = {
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state(),
    }
    return _host_copy(state) if copy else state


def _host_copy(value):
    """`value` with every tensor in it copied to the CPU (dicts, lists and tuples walked)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _host_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_host_copy(v) for v in value)
    return copy.deepcopy(value)


def snapshot_writer(model, lora_base: str | None, special_tokens: dict):
    """model_writer for a one-process (or DDP) run, from a host copy of the weights taken now: what
    it writes later is this step's model whatever training does meanwhile."""
    if is_lora(model):
        state = {name: _host_copy(p) for name, p in model.named_parameters() if p.requires_grad}
        return lambda folder: save_adapter(model, folder, lora_base, state=state)
    export = HostCopy(model, {name: _host_copy(t) for name, t in model.state_dict().items()})
    return lambda folder: save_hf(export, folder, special_tokens, MAX_SHARD_BYTES)


class HostCopy:
    """A model's state copied apart from it, with what save_hf needs of the model besides."""

    def __init__(self, model, state: dict):
        self.args, self._state = model.args, state
        self.hf_config, self.hf_generation_config = model.hf_config, model.hf_generation_config

    def state_dict(self) -> dict:
        return self._state


def is_lora(model) -> bool:
    return getattr(model, "lora", None) is not None


def model_writer(
    model, sharded: bool, lora_base: str | None, special_tokens: dict[str, int | None], is_main: bool = True
):
    """folder -> None writing the model as a checkpoint holds it: a Hugging Face folder (with the
    tokenizer's `special_tokens` ids), or a LoRA run's adapters in PEFT's format.

    `sharded` (FSDP or tensor parallelism): every rank calls this and then what it returns, at the
    same point, since both gather. The adapters (small) are gathered here; the weights a tensor at a
    time while rank 0 writes them, a file at a time (gathered_writer). On the other ranks the
    returned function writes nothing."""
    if is_lora(model):
        state = {name: gather(p) for name, p in model.named_parameters() if p.requires_grad} if sharded else None
        if not is_main:
            return lambda folder: None
        return lambda folder: save_adapter(model, folder, lora_base, state=state)
    if not sharded:
        return lambda folder: save_hf(model, folder, special_tokens, MAX_SHARD_BYTES)
    state = model.state_dict()
    return gathered_writer(
        model, state, lambda names, keep: gather_tensors(state, names, keep), special_tokens, is_main
    )


def gathered_writer(model, layout: dict, gather, special_tokens: dict[str, int | None], is_main: bool):
    """folder -> None, collective: rank 0 writes the Hugging Face folder with write_hf, fetching each
    file's tensors with `gather(names, True)`; every other rank calls `gather(names, False)` for all
    of them at once, in the same order (the order of rank 0's fetches), taking part in the same
    collectives and keeping nothing. `layout`: write_hf's, our names in order with their shapes."""
    if is_main:

        def write(folder) -> None:
            write_hf(model, folder, layout, lambda names: gather(names, True), special_tokens, MAX_SHARD_BYTES)

        return write
    return lambda folder: gather(exported_names(model.args, layout), False)


def merged_writer(model, special_tokens: dict[str, int | None], is_main: bool):
    """gathered_writer of a sharded LoRA model's merged weights (final/merged/): every adapter is
    gathered here (they are small), then each base weight while rank 0 writes (dequantized first
    where it is 4-bit), merged into one tensor by merge_state_dict and dropped; so rank 0 holds a
    file's worth of merged weights and one base weight, never the whole base. Collective, as what
    it returns is."""
    state = model.state_dict()
    adapter_names = [name for name in state if is_lora_key(name)]
    adapters = gather_tensors(state, adapter_names, is_main)
    scaling, dtype = model.lora.scaling, base_dtype(model)
    # Each base tensor merges into one tensor of the plain model; merging meta tensors names it and
    # gives its shape and dtype without any weight (merge_state_dict skips the adapters it is handed
    # besides the ones of the tensor merged).
    adapter_metas = {name: _meta(state[name]) for name in adapter_names}
    layout, source = {}, {}
    for name, tensor in state.items():
        if is_lora_key(name):
            continue
        ((merged_name, meta),) = merge_state_dict(
            {name: _meta(tensor), **adapter_metas}, scaling, dtype, "meta"
        ).items()
        layout[merged_name], source[merged_name] = meta, name

    def gather_merged(names: list[str], keep: bool) -> dict[str, torch.Tensor]:
        merged = {}
        for name in names:
            # A 4-bit base (QLoRA under FSDP2: DTensor shards of NF4Tensors) is dequantized shard by
            # shard before it is gathered: DTensor cannot gather NF4Tensors, and each rank's rows
            # dequantize alone (their scales' mean is the whole tensor's).
            ours = source[name]
            base = gather_tensors({ours: dense(state[ours])}, [ours], keep)
            if keep:
                merged.update(merge_state_dict({**base, **adapters}, scaling, dtype))
            del base  # before the next one is gathered
        return merged

    return gathered_writer(model, layout, gather_merged, special_tokens, is_main)


def read_back_writer(model, shards: Path, special_tokens: dict[str, int | None]):
    """folder -> None writing a sharded run's Hugging Face folder from the model's shards that
    save_sharded(_async) writes into `shards`, read back a file's worth at a time in this process
    alone: no collective, so a background thread can run it while training goes on."""
    layout = {name: _meta(t) for name, t in model.state_dict().items()}
    export = HostCopy(model, {})  # args and configs only: the thread holds no reference to the model

    def write(folder) -> None:
        fetch = lambda names: read_model_tensors(shards, layout, names)  # noqa: E731
        write_hf(export, folder, layout, fetch, special_tokens, MAX_SHARD_BYTES)

    return write


def _meta(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor of `tensor`'s (global) shape and dtype, without storage."""
    return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP shard (a DTensor), collective; a plain tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _write_checkpoint(
    tmp: Path,
    final: Path,
    write_model,
    *,
    training_state: dict,
    trainer_state: dict,
    sampler_state: dict,
    config_toml: str,
    tokenizer,
    readme: str | None = None,
) -> None:
    write_model(tmp)
    tokenizer.save(tmp)
    (tmp / "run_config.toml").write_text(config_toml)
    if readme is not None:  # the model card (trainer/model_card.py)
        (tmp / "README.md").write_text(readme)
    torch.save(training_state, tmp / "training_state.pt")
    (tmp / STATE_FILE).write_text(json.dumps({"trainer": trainer_state, "sampler": sampler_state}, indent=1))
    _fsync_tree(tmp)
    if final.exists():  # saving the same step again (a resumed run): swap, then drop the old one
        old = final.parent / f".old-checkpoint-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


class DamagedCheckpoint(CheckpointError):
    """A file of a checkpoint cannot be read (truncated, corrupt or missing)."""

    def __init__(self, file: Path, reason: str):
        self.file = file
        super().__init__(f"{file} is damaged ({reason})")


def _damaged(file: Path, error: BaseException) -> DamagedCheckpoint:
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return DamagedCheckpoint(file, reason[:200])


def verify_checkpoint(path: str | Path) -> None:
    """Cheap structural checks of every file a resume reads, without loading any tensor.

    Catches what a crash or a full disk leaves: a missing file, a truncated safetensors file (its
    header names more bytes than the file has), a torch.save archive cut short (no zip directory).
    """
    path = Path(path)
    for name in (STATE_FILE, "training_state.pt"):
        if not (path / name).is_file():
            raise DamagedCheckpoint(path / name, "missing")
    try:
        json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise _damaged(path / STATE_FILE, e) from None
    if not zipfile.is_zipfile(path / "training_state.pt"):
        raise DamagedCheckpoint(path / "training_state.pt", "not a complete torch.save archive")
    if is_adapter_folder(path):
        files = [path / ADAPTER_WEIGHTS]
    else:
        try:
            files = weight_files(path)
        except CheckpointError:
            raise DamagedCheckpoint(path / "model.safetensors", "missing") from None
    for file in files:
        if not file.is_file():
            raise DamagedCheckpoint(file, "missing")
        _verify_safetensors(file)


def _verify_safetensors(file: Path) -> None:
    try:
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        size = file.stat().st_size
    except (OSError, ValueError) as e:
        raise _damaged(file, e) from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise DamagedCheckpoint(file, f"truncated: {size} bytes where its header needs {8 + header_len + end}")


def load_checkpoint(
    path: str | Path, *, model, optimizer=None, scheduler=None, scaler=None, sharded: bool = False
) -> dict:
    """Restores everything saved and returns {"trainer": ..., "sampler": ...}.

    Either kind of checkpoint loads into either kind of run: shards from `distributed/` are
    resharded to this run's layout (or gathered, in one process); a one-process checkpoint loads
    into a `sharded` (FSDP) model by each rank keeping its part of the full tensors. A file that
    cannot be read raises DamagedCheckpoint naming it; a checkpoint of another model or optimizer
    raises CheckpointError naming what differs.
    """
    path = Path(path)
    if not (path / STATE_FILE).is_file() and not any(path.glob("*.safetensors")):
        raise CheckpointError(f"{str(path)!r} is not a checkpoint (no {STATE_FILE}); pass a checkpoint-<step> folder")
    verify_checkpoint(path)
    saved = json.loads((path / STATE_FILE).read_text())
    extra = None
    if optimizer is not None:
        try:
            extra = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
        except Exception as e:  # a corrupt archive fails in many ways (zip, pickle, storage errors)
            raise _damaged(path / "training_state.pt", e) from None
    try:
        adapter = is_adapter_folder(path)
        # A LoRA checkpoint into a full run or the reverse: one line saying which and what to do.
        check_checkpoint_kind(_tensor_names(path / ADAPTER_WEIGHTS) if adapter else [], model, str(path))
        if (path / SHARDED_DIR).is_dir():
            load_sharded(path / SHARDED_DIR, model, optimizer, trainable_only=adapter)
        elif adapter and sharded:
            raise CheckpointError(
                f"{path} is a one-process LoRA checkpoint; resume it in one process or under "
                "parallel.strategy=ddp (FSDP resumes LoRA checkpoints that FSDP saved)"
            )
        elif adapter:
            try:
                load_adapter_weights(model, path)
            except CheckpointError:
                raise
            except Exception as e:
                raise _damaged(path / ADAPTER_WEIGHTS, e) from None
            if optimizer is not None:
                optimizer.load_state_dict(extra["optimizer"])
        else:
            try:
                state = model_state(model.args, load_state_dict(path))
            except Exception as e:
                raise _damaged(weight_files(path)[0], e) from None
            if sharded:
                load_full_state(model, optimizer, state, extra["optimizer"] if extra else None)
            else:
                load_weights(model, state, str(path))
                if optimizer is not None:
                    optimizer.load_state_dict(extra["optimizer"])
    except CheckpointError as e:
        raise CheckpointError(f"{e}{_shape_difference(path, model)}") from None
    except (ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(
            f"the model or optimizer state in {path} does not fit this run: "
            f"{str(e).splitlines()[0]}{_shape_difference(path, model)}"
        ) from None
    if optimizer is not None:
        scheduler.load_state_dict(extra["scheduler"])
        if scaler is not None and extra["scaler"] is not None:
            scaler.load_state_dict(extra["scaler"])
        set_rng_state(extra["rng"])  # a sharded run restores rank 0's state on every rank
    return saved


def _tensor_names(file: Path) -> list[str]:
    with safe_open(str(file), framework="pt") as f:
        return list(f.keys())


def _shape_difference(path: Path, model) -> str:
    """'; the checkpoint's model has hidden_size 128, this run's 256' when the shapes differ."""
    try:
        theirs = args_from_hf_config(read_hf_config(path)).to_dict()
    except Exception:
        return ""
    ours = model.args.to_dict()
    keys = ("vocab_size", "hidden_size", "intermediate_size", "n_layers", "n_heads", "n_kv_heads")
    differ = [k for k in keys if theirs.get(k) != ours.get(k)]
    if not differ:
        return ""
    return (
        "; the checkpoint's model has "
        + ", ".join(f"{k} {theirs[k]}" for k in differ)
        + ", this run's "
        + ", ".join(f"{k} {ours[k]}" for k in differ)
    )


def newest_loadable(output_dir: str | Path, below: Path | None = None) -> Path | None:
    """The newest checkpoint in `output_dir` (older than `below`, if given) that passes verify_checkpoint."""
    for candidate in reversed(checkpoint_dirs(output_dir)):
        if below is not None and _step_of(candidate) >= _step_of(below):
            continue
        try:
            verify_checkpoint(candidate)
            return candidate
        except DamagedCheckpoint:
            continue
    return None


def _step_of(path: Path) -> int:
    m = CHECKPOINT_RE.match(path.name)
    return int(m.group(1)) if m else -1


class Checkpointer:
    """A run's checkpoints: saved into its folder and rotated; the final model written to final/."""

    def __init__(
        self,
        folder: Path,
        *,
        keep_last: int,
        config_toml: str,
        tokenizer,
        sharded: bool,
        is_main: bool,
        lora_base: str | None = None,
        save_merged: bool = True,
        async_save: bool = False,
    ):
        self.folder, self.keep_last, self.config_toml = Path(folder), keep_last, config_toml
        self.tokenizer, self.sharded, self.is_main = tokenizer, sharded, is_main
        self.lora_base, self.save_merged = lora_base, save_merged  # LoRA runs: the base model's folder
        self.model_card = None  # folder -> its README.md (the loop sets it: trainer/model_card.py); None: no card
        # checkpoint.async_save: the save being written by a thread, and what it raised
        self.async_save = async_save
        self._writing: threading.Thread | None = None
        self._failed: CheckpointError | None = None
        # Sharded runs: the shards this rank is writing (DCP), and the process group of those writes
        self._shards: Future | None = None
        self._group = dist.new_group(backend="gloo") if async_save and sharded else None

    def save(
        self, step: int, *, model, optimizer, scheduler, scaler, trainer_state: dict, sampler_state: dict
    ) -> Path | None:
        """checkpoint-<step>, then rotation (the best checkpoint is kept); collective under FSDP.
        With async_save the weights and states are copied to host memory here and written by a
        thread; the next save (or save_final, or wait) waits for it and raises what it raised."""
        self.wait()
        if self.async_save and self.sharded:
            self._save_sharded_in_background(step, model, optimizer, scheduler, scaler, trainer_state, sampler_state)
            return self.folder / f"checkpoint-{step}"
        if self.async_save:
            if self.is_main:
                self._save_in_background(step, model, optimizer, scheduler, scaler, trainer_state, sampler_state)
            return self.folder / f"checkpoint-{step}"
        path = None
        if self.is_main or self.sharded:  # every rank writes its own shards
            try:
                path = save_checkpoint(
                    self.folder,
                    step,
                    model=model,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    scaler=scaler,
                    trainer_state=trainer_state,
                    sampler_state=sampler_state,
                    config_toml=self.config_toml,
                    tokenizer=self.tokenizer,
                    sharded=self.sharded,
                    is_main=self.is_main,
                    lora_base=self.lora_base,
                    readme=self.model_card(self.folder / f"checkpoint-{step}") if self.model_card else None,
                )
            except OSError as e:  # a full disk, a quota, a folder gone: the earlier checkpoints are intact
                for partial in self.folder.glob(f".tmp-checkpoint-{step}*"):
                    shutil.rmtree(partial, ignore_errors=True)
                latest = latest_checkpoint(self.folder)
                raise CheckpointError(
                    f"could not write checkpoint-{step} into {self.folder}: {e.strerror or e}; nothing was replaced "
                    f"(newest complete checkpoint: {latest or 'none'}); free space and continue with "
                    f"--checkpoint.resume_from=latest --train.output_dir={self.folder}"
                ) from None
        if self.is_main:
            rotate_checkpoints(self.folder, self.keep_last, trainer_state.get("best_checkpoint"))
        return path

    def _save_sharded_in_background(
        self, step, model, optimizer, scheduler, scaler, trainer_state, sampler_state
    ) -> None:
        """Collective. Every rank's shards go to host memory and are written by DCP's thread. Rank 0's
        thread waits until every shard is written, then writes model.safetensors from them (read
        back a file at a time: no collective, no whole copy of the model anywhere), the rest, and
        renames the folder: until then no checkpoint-<step> exists."""
        tmp = self.folder / f".tmp-checkpoint-{step}"  # ranks agree on it: not named by process id
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()  # the folder exists before any rank writes into it
        self._shards = save_sharded_async(tmp / SHARDED_DIR, model, optimizer, is_lora(model), self._group)
        special_tokens = self.tokenizer.special_token_ids()
        if is_lora(model):  # collective: the adapters gathered now, as new tensors (distributed/ lacks the base)
            write_model = model_writer(model, True, self.lora_base, special_tokens, self.is_main)
        else:
            write_model = read_back_writer(model, tmp / SHARDED_DIR, special_tokens)
        if self.is_main:
            shards, self._shards = self._shards, None
            states = training_state(None, scheduler, scaler, copy=True)
            self._write_in_background(step, tmp, write_model, states, trainer_state, sampler_state, shards)

    def _save_in_background(self, step, model, optimizer, scheduler, scaler, trainer_state, sampler_state) -> None:
        tmp = self.folder / f".tmp-checkpoint-{step}-{os.getpid()}"
        write_model = snapshot_writer(model, self.lora_base, self.tokenizer.special_token_ids())
        states = training_state(optimizer, scheduler, scaler, copy=True)
        self._write_in_background(step, tmp, write_model, states, trainer_state, sampler_state)

    def _write_in_background(
        self, step, tmp: Path, write_model, states, trainer_state, sampler_state, shards: Future | None = None
    ) -> None:
        """A thread writes checkpoint-<step> into `tmp` (after `shards`, DCP's, are written) and renames it."""
        final = self.folder / f"checkpoint-{step}"
        trainer_state, sampler_state = copy.deepcopy(trainer_state), copy.deepcopy(sampler_state)
        readme = self.model_card(final) if self.model_card else None

        def write() -> None:
            try:
                if shards is not None:
                    shards.result()
                else:
                    shutil.rmtree(tmp, ignore_errors=True)
                    tmp.mkdir(parents=True)
                _write_checkpoint(
                    tmp,
                    final,
                    write_model,
                    training_state=states,
                    trainer_state=trainer_state,
                    sampler_state=sampler_state,
                    config_toml=self.config_toml,
                    tokenizer=self.tokenizer,
                    readme=readme,
                )
                rotate_checkpoints(self.folder, self.keep_last, trainer_state.get("best_checkpoint"))
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                self._failed = CheckpointError(
                    f"could not write checkpoint-{step} into {self.folder}: {e.strerror or e}; nothing was "
                    f"replaced (newest complete checkpoint: {latest_checkpoint(self.folder) or 'none'}); free "
                    f"space and continue with --checkpoint.resume_from=latest --train.output_dir={self.folder}"
                )

        self._writing = threading.Thread(target=write, name=f"checkpoint-{step}")
        self._writing.start()

    def wait(self) -> None:
        """Returns once no save is being written; raises what a background save raised."""
        if self._shards is not None:
            shards, self._shards = self._shards, None
            try:
                shards.result()
            except OSError as e:
                self._failed = CheckpointError(
                    f"could not write this rank's shards into {self.folder}: {e.strerror or e}"
                )
        if self._writing is not None:
            self._writing.join()
            self._writing = None
        if self._failed is not None:
            failed, self._failed = self._failed, None
            raise failed

    def save_final(self, model) -> Path:
        """final/: the model as a Hugging Face folder with the tokenizer; collective under FSDP.

        A LoRA run's final/ is its adapter in PEFT's format, with final/merged/ beside it: base
        and adapters merged into one Hugging Face model (dequantized for QLoRA) unless
        lora.save_merged=false. Sharded, the weights (merged or not) are gathered a tensor at a time
        while rank 0 writes them a file at a time.
        """
        self.wait()
        special_tokens = self.tokenizer.special_token_ids()
        write_model = model_writer(model, self.sharded, self.lora_base, special_tokens, self.is_main)
        write_merged = None
        if is_lora(model) and self.save_merged:
            if self.sharded:
                write_merged = merged_writer(model, special_tokens, self.is_main)
            elif self.is_main:
                merged = merged_model(model)
                write_merged = lambda folder: save_hf(merged, folder, special_tokens, MAX_SHARD_BYTES)  # noqa: E731
        final = self.folder / "final"
        tmp = self.folder / ".tmp-final"
        if not self.is_main:
            if self.sharded:  # the gathers of rank 0's writes, in the same order
                write_model(tmp)
                if write_merged is not None:
                    write_merged(tmp / "merged")
            return final
        shutil.rmtree(tmp, ignore_errors=True)
        write_model(tmp)
        if self.model_card is not None:
            (tmp / "README.md").write_text(self.model_card(final))
        folders = [tmp]
        if write_merged is not None:
            write_merged(tmp / "merged")
            folders.append(tmp / "merged")
        for folder in folders:
            self.tokenizer.save(folder)
            (folder / "run_config.toml").write_text(self.config_toml)
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        return final


def rotate_checkpoints(output_dir: str | Path, keep_last: int, protect: str | None) -> list[Path]:
    """Deletes the oldest checkpoints beyond `keep_last`, never the `protect`ed (best) one."""
    if keep_last <= 0:
        return []
    found = checkpoint_dirs(output_dir)
    doomed = [p for p in found[:-keep_last] if protect is None or p.resolve() != Path(protect).resolve()]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed
