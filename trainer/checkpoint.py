"""Checkpoints: written to a temporary folder and renamed into place, rotated, resumed.

A checkpoint folder `checkpoint-<step>` holds the model as a Hugging Face folder (config.json +
model.safetensors), the tokenizer, the run's config, and the training state: optimizer, scheduler,
scaler, RNG states, the data sampler's position and the trainer state. A sharded (FSDP) run adds
`distributed/`: its model and optimizer shards, written by every rank through DCP. `trainer_state.json` is
written last, and the folder only gets its final name once everything in it is on disk, so a crash
mid-save never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from trainer.errors import CheckpointError
from trainer.models.hf import load_state_dict, load_weights, save_hf
from trainer.parallel.distributed import barrier
from trainer.parallel.sharded_checkpoint import full_model_state, load_full_state, load_sharded, save_sharded

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
SHARDED_DIR = "distributed"  # DCP shards of the model and optimizer, in checkpoints of sharded runs


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


def save_checkpoint(output_dir: str | Path, step: int, *, model, optimizer, scheduler, scaler, trainer_state: dict,
                    sampler_state: dict, config_toml: str, tokenizer, sharded: bool = False,
                    is_main: bool = True) -> Path:
    """Writes checkpoint-<step>; with `sharded` (an FSDP run) every rank must call it.

    A sharded checkpoint also holds the model and optimizer shards in `distributed/` (DCP), and
    its model.safetensors is the full model gathered on rank 0, so `eval` reads it like any other.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    # Ranks must agree on the temporary folder, so a sharded save cannot name it by process id.
    tmp = output_dir / (f".tmp-checkpoint-{step}" if sharded else f".tmp-checkpoint-{step}-{os.getpid()}")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    export = model
    if sharded:
        barrier()  # the folder exists before any rank writes into it
        save_sharded(tmp / SHARDED_DIR, model, optimizer)
        export = GatheredModel(model.args, full_model_state(model))
    if is_main:
        _write_checkpoint(tmp, final, export, optimizer=None if sharded else optimizer, scheduler=scheduler,
                          scaler=scaler, trainer_state=trainer_state, sampler_state=sampler_state,
                          config_toml=config_toml, tokenizer=tokenizer)
    if sharded:
        barrier()  # no rank moves on (or rotates, or saves again) before the rename
    return final


class GatheredModel:
    """A model's full state gathered from its shards, with its args: what save_hf needs of a model."""

    def __init__(self, args, state: dict):
        self.args, self._state = args, state

    def state_dict(self) -> dict:
        return self._state


def _write_checkpoint(tmp: Path, final: Path, model, *, optimizer, scheduler, scaler, trainer_state: dict,
                      sampler_state: dict, config_toml: str, tokenizer) -> None:
    save_hf(model, tmp)
    tokenizer.save(tmp)
    (tmp / "run_config.toml").write_text(config_toml)
    torch.save({
        "optimizer": optimizer.state_dict() if optimizer is not None else None,  # None: in distributed/
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state(),
    }, tmp / "training_state.pt")
    (tmp / STATE_FILE).write_text(json.dumps({"trainer": trainer_state, "sampler": sampler_state}, indent=1))
    _fsync_tree(tmp)
    if final.exists():  # saving the same step again (a resumed run): swap, then drop the old one
        old = final.parent / f".old-checkpoint-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def load_checkpoint(path: str | Path, *, model, optimizer=None, scheduler=None, scaler=None,
                    sharded: bool = False) -> dict:
    """Restores everything saved and returns {"trainer": ..., "sampler": ...}.

    Either kind of checkpoint loads into either kind of run: shards from `distributed/` are
    resharded to this run's layout (or gathered, in one process); a one-process checkpoint loads
    into a `sharded` (FSDP) model by each rank keeping its part of the full tensors.
    """
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{str(path)!r} is not a complete checkpoint (no {STATE_FILE})")
    extra = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True) if optimizer else None
    try:
        if (path / SHARDED_DIR).is_dir():
            load_sharded(path / SHARDED_DIR, model, optimizer)
        elif sharded:
            load_full_state(model, optimizer, load_state_dict(path), extra["optimizer"] if extra else None)
        else:
            load_weights(model, load_state_dict(path), str(path))
            if optimizer is not None:
                optimizer.load_state_dict(extra["optimizer"])
    except (ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"the model or optimizer state in {path} does not fit this run: {e}") from None
    if optimizer is not None:
        scheduler.load_state_dict(extra["scheduler"])
        if scaler is not None and extra["scaler"] is not None:
            scaler.load_state_dict(extra["scaler"])
        set_rng_state(extra["rng"])  # a sharded run restores rank 0's state on every rank
    return json.loads((path / STATE_FILE).read_text())


def rotate_checkpoints(output_dir: str | Path, keep_last: int, protect: str | None) -> list[Path]:
    """Deletes the oldest checkpoints beyond `keep_last`, never the `protect`ed (best) one."""
    if keep_last <= 0:
        return []
    found = checkpoint_dirs(output_dir)
    doomed = [p for p in found[:-keep_last] if protect is None or p.resolve() != Path(protect).resolve()]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed
