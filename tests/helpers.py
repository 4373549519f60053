"""Small corpora and configs shared by the loop, checkpoint and CLI tests."""

from __future__ import annotations

import random
from pathlib import Path

from trainer.callbacks import TrainerCallback
from trainer.config import load_config

WORDS = (
    "the model learns tokens from text while gradients flow back through every layer and the loss "
    "falls as steps go by with def return class import for while if else"
).split()


def write_corpus(folder: Path, n_docs: int = 24, words_per_doc: int = 300, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        text = " ".join(rng.choice(WORDS) for _ in range(words_per_doc))
        (folder / f"doc{i:03d}.txt").write_text(text + "\n")
    return folder


def tiny_config(tmp_path: Path, **overrides):
    """A config for a few fast steps of the tiny model on a made-up corpus, in fp32 on CPU."""
    corpus = tmp_path / "corpus"
    if not corpus.exists():
        write_corpus(corpus)
    values = {
        "model.preset": "tiny",
        "data.path": str(corpus),
        "data.tokenizer": "byte",
        "data.val_fraction": 0.1,
        "data.cache_dir": str(tmp_path / "cache"),
        "train.output_dir": str(tmp_path / "run"),
        "train.max_steps": 4,
        "train.micro_batch_size": 2,
        "train.seq_len": 32,
        "train.dtype": "fp32",
        "train.device": "cpu",
        "train.progress": "none",
        "train.eval_batches": 2,
        "optim.warmup_steps": 1,
        "optim.lr": 1e-3,
    }
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_config(None, values)


class StopAt(TrainerCallback):
    """Stops a run after `step`, as an interruption would (a checkpoint is saved there)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, config, state, control, **kwargs):
        if state.step == self.step:
            control.should_training_stop = True
