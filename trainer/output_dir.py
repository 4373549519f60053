"""The output folder's policy: where a run writes, what it resumes, and what it may replace.

Two phases, so that nothing a user has is touched by a run that fails to start: `plan_output`
only looks (its one write is an empty probe folder, removed at once) and is called before the data
and the model are built; `claim_output` creates the folder and, for `train.overwrite=true`,
removes the previous run's outputs, and is called once everything else has been checked, just
before the run writes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from trainer.checkpoint import checkpoint_dirs
from trainer.errors import CheckpointError, ConfigError, TrainerError

# What a run writes at the top of its folder; an overwrite removes these and the checkpoints.
RUN_OUTPUTS = ("metrics.jsonl", "train_results.json", "loss.png", "config.toml", "final", "tensorboard")


@dataclass
class OutputPlan:
    folder: Path
    resume: Path | None = None  # a checkpoint folder, or None for a fresh start
    resume_latest: bool = False  # checkpoint.resume_from=latest: newest loadable checkpoint, else fresh
    replace_previous: bool = False  # train.overwrite=true over a folder that holds a finished or saved run
    messages: list[str] = field(default_factory=list)


def default_output_dir() -> str:
    return str(Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))


def plan_output(train, checkpoint) -> OutputPlan:
    """Checks train.output_dir / checkpoint.resume_from / train.overwrite without touching the disk."""
    resume = None
    output_dir = train.output_dir
    if checkpoint.resume_from and checkpoint.resume_from != "latest":
        resume = Path(checkpoint.resume_from)
        if not resume.is_dir():
            what = "is not a folder" if resume.exists() else "does not exist"
            raise CheckpointError(
                f"checkpoint.resume_from={checkpoint.resume_from!r} {what}; pass a checkpoint-<step> folder or latest"
            )
        output_dir = output_dir or str(resume.parent)
    folder = Path(output_dir or default_output_dir())
    check_writable(folder, "train.output_dir")
    plan = OutputPlan(folder, resume=resume, resume_latest=checkpoint.resume_from == "latest")
    if plan.resume_latest and not checkpoint_dirs(folder):
        plan.resume_latest = False
        plan.messages.append(f"checkpoint.resume_from=latest: no checkpoint in {folder} yet, starting fresh")
    fresh = resume is None and not plan.resume_latest
    if fresh and (checkpoint_dirs(folder) or (folder / "final").exists()):
        if not train.overwrite:
            raise TrainerError(
                f"{folder} already holds a run's checkpoints; resume it with "
                "--checkpoint.resume_from=latest, choose another --train.output_dir, "
                "or pass --train.overwrite=true to replace them"
            )
        plan.replace_previous = True
    return plan


def check_writable(folder: Path, key: str) -> None:
    """A folder that exists and is writable, or can be created: else a one-line error naming `key`."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{key}={str(folder)!r} is a file, not a folder; choose another {key}")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}={str(folder)!r} cannot be created: {str(existing)!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{key}={str(folder)!r} is not writable (no permission on {str(existing)!r}); choose another {key}"
        )
    # os.access says yes to root everywhere, and knows nothing of read-only mounts or of /proc and
    # /sys: try what the run will do, an empty folder made and removed again.
    try:
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".probe-"))
    except OSError as e:
        raise ConfigError(
            f"{key}={str(folder)!r} cannot be created in {str(existing)!r} ({e.strerror or e}); choose another {key}"
        ) from None


def claim_output(plan: OutputPlan) -> None:
    """Creates the folder and, when the plan replaces a previous run, removes that run's outputs."""
    if plan.replace_previous:
        for path in checkpoint_dirs(plan.folder) + [plan.folder / name for name in RUN_OUTPUTS]:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    try:
        plan.folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"train.output_dir={str(plan.folder)!r} cannot be created: {e.strerror}") from None
