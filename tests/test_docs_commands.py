"""Every command in README.md and docs/*.md runs as written, with its shapes shrunk.

The commands are read from the ```bash blocks at test time, so a command added to the docs is
tested without touching this file. What is changed before a command runs, and why:
- placeholders become real things made here: a model folder for `/models/...`, a corpus for
  `data/...`, a small config for `my_run.toml`, a finished run for `runs/<...>/final`;
- `train` and `bench` get SHRINK appended (later overrides win): the tiny model, 2 steps of 2 x 32
  tokens, on this CPU, into a folder of their own. Their own settings (optimizer, dtype, LoRA,
  checkpointing, ...) stay as written; with `--model.from_hf` the model stays that folder's;
- launchers start 2 processes instead of 8;
- commands that need several machines are left out, each with its reason in MACHINES_NEEDED.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import write_corpus
from trainer.data import ByteTokenizer
from trainer.models import build, save_hf
from trainer.models.config import PRESETS, ModelArgs

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"^(python3? -m trainer|trainer |torchrun |accelerate launch )")
MACHINES_NEEDED = {
    "--nnodes": "several machines (torchrun --nnodes)",
    "--num_machines": "several machines (accelerate --num_machines)",
    "--multi_gpu": "several GPUs (accelerate --multi_gpu)",
}
SHRINK = {
    "train.max_steps": 2,
    "train.seq_len": 32,
    "train.micro_batch_size": 2,
    "train.eval_batches": 1,
    "train.device": "cpu",
    "train.progress": "none",
    "optim.warmup_steps": 0,
    "checkpoint.save_every": 0,
    "bench.warmup_steps": 1,
}


def documented_commands() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", doc.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s+#.*$", "", line.strip())  # a trailing comment
                if COMMAND.match(line):
                    found.append((doc.relative_to(ROOT).as_posix(), " ".join(line.split())))
    return found


COMMANDS = documented_commands()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """The things the placeholders stand for."""
    tmp = tmp_path_factory.mktemp("docs")
    corpus = write_corpus(tmp / "corpus")
    model = tmp / "models" / "model"
    # The tiny preset 256 wide: its projections split over 2 ranks in whole 4-bit groups (QLoRA under FSDP2)
    shape = {**PRESETS["tiny"], "vocab_size": 320, "hidden_size": 256, "intermediate_size": 512}
    save_hf(build(ModelArgs(**shape), seed=0), model)
    ByteTokenizer().save(str(model))
    sft = tmp / "sft.jsonl"
    sft.write_text(
        "".join(json.dumps({"prompt": f"question {i}?", "completion": f" answer {i}."}) + "\n" for i in range(40))
    )
    config = tmp / "my_run.toml"
    config.write_text(
        f'[model]\npreset = "tiny"\n[data]\npath = "{corpus}"\ntokenizer = "byte"\n'
        f'cache_dir = "{tmp / "cache"}"\n[train]\nmax_steps = 2\n'
        f'output_dir = "{tmp / "runs" / "my_run"}"\n'
    )
    finished = tmp / "runs" / "finished"
    args = ["train", str(config), f"--train.output_dir={finished}", *shrink_args(tmp, "finished")]
    done = subprocess.run([sys.executable, "-m", "trainer", *args], cwd=tmp, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return {"tmp": tmp, "corpus": corpus, "model": model, "sft": sft, "config": config, "final": finished / "final"}


def shrink_args(tmp: Path, name: str) -> list[str]:
    values = {**SHRINK, "train.output_dir": tmp / "runs" / name, "data.cache_dir": tmp / "cache"}
    return [f"--{key}={value}" for key, value in values.items()]


def prepared(command: str, world: dict, index: int) -> list[str]:
    """The command with its placeholders filled in and, for train and bench, shrunk."""
    text = re.sub(r"/models/[\w.-]+", str(world["model"]), command)
    text = re.sub(r"runs/<[^>]+>/final", str(world["final"]), text)
    text = text.replace("data/sft.jsonl", str(world["sft"])).replace("data/*.jsonl", str(world["corpus"]))
    text = text.replace("my_run.toml", str(world["config"]))
    argv = shlex.split(text)
    for launcher_flag in ("--nproc_per_node", "--num_processes"):
        if launcher_flag in argv:
            argv[argv.index(launcher_flag) + 1] = "2"
    if argv[0] == "trainer":
        argv = [sys.executable, "-m", "trainer", *argv[1:]]
    elif argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    subcommand = next((a for a in argv if a in ("train", "bench", "eval", "generate", "plan")), None)
    if subcommand in ("train", "bench") and "--help" not in argv:
        argv += shrink_args(world["tmp"], f"command-{index}")
        if not any(a.startswith("--model.from_hf") for a in argv):
            argv += ["--model.preset=tiny", "--data.tokenizer=byte"]
        if not any(a.startswith("--data.path") for a in argv) and str(world["config"]) not in argv:
            argv.append(f"--data.path={world['corpus']}")
    return argv


def launches_processes(command: str) -> list:
    return [pytest.mark.distributed] if command.startswith(("torchrun", "accelerate")) else []


@pytest.mark.slow
@pytest.mark.parametrize(
    "doc, command",
    [pytest.param(d, c, marks=launches_processes(c)) for d, c in COMMANDS],
    ids=[f"{d}:{c[:60]}" for d, c in COMMANDS],
)
def test_documented_command_runs(world, doc, command):
    needs = [why for flag, why in MACHINES_NEEDED.items() if flag in command]
    if needs:
        pytest.skip(f"needs {needs[0]}")
    argv = prepared(command, world, COMMANDS.index((doc, command)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(argv, cwd=world["tmp"], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, f"{doc}: {' '.join(argv)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


def test_the_docs_hold_commands():
    assert len(COMMANDS) >= 10 and any(d.startswith("docs/") for d, _ in COMMANDS)
