"""parallel.*: FSDP2 and DDP on 2 CPU ranks (gloo, via torchrun) against one process, sharded
checkpoints across world sizes, compile and activation checkpointing against eager, and a failing
rank stopping the job.

Every multi-rank run trains the tiny model in fp32 on the same global batch as its one-process
reference (2 ranks x micro-batch 2, or 2 ranks x 2 accumulated micro-batches of 1, against 1 x 4),
so the losses must agree step by step.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.helpers import tiny_config, write_corpus
from trainer import Trainer, load_config
from trainer.errors import ConfigError
from trainer.metrics import read_metrics
from trainer.models import build
from trainer.parallel import apply_activation_checkpointing, init_distributed

REPO = Path(__file__).resolve().parents[1]
STEPS = 5
RTOL = 1e-5
RUN_TIMEOUT_S = 150  # a hang fails the test instead of stalling the suite

BASE = {
    "model.preset": "tiny",
    "data.tokenizer": "byte",
    "data.val_fraction": 0.1,
    "train.max_steps": STEPS,
    "train.seq_len": 32,
    "train.dtype": "fp32",
    "train.device": "cpu",
    "train.progress": "none",
    "train.eval_batches": 2,
    "optim.warmup_steps": 1,
    "optim.lr": 1e-3,
}


def _overrides(tmp: Path, output: str, **extra) -> list[str]:
    values = {
        **BASE,
        "data.path": str(tmp / "corpus"),
        "data.cache_dir": str(tmp / "cache"),
        "train.output_dir": str(tmp / output),
        **{k.replace("__", "."): v for k, v in extra.items()},
    }
    return [f"--{k}={v}" for k, v in values.items()]


def _env() -> dict:
    # One thread per rank: the two ranks share a small machine with other jobs.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def torchrun(args: list[str], timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def train_one_process(args: list[str]) -> None:
    # In this process (no process group), as the one-process reference and resume runs need none.
    Trainer(load_config(None, args)).train()


def train_two_ranks(args: list[str]) -> None:
    result = torchrun(["-m", "trainer", "train", *args])
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]


def step_records(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


def assert_same_steps(run: Path, reference: Path, steps) -> None:
    got, want = step_records(run), step_records(reference)
    assert sorted(got) == list(steps)
    for step in steps:
        for key in ("loss", "grad_norm"):
            rel = abs(got[step][key] - want[step][key]) / abs(want[step][key])
            assert rel <= RTOL, (run.name, step, key, got[step][key], want[step][key])
        assert got[step]["tokens"] == want[step]["tokens"]  # the global label-token count


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The one-process reference run: micro-batch 4, checkpoints at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("parallel")
    write_corpus(tmp / "corpus")
    train_one_process(_overrides(tmp, "one", train__micro_batch_size=4, checkpoint__save_every=2))
    return tmp


@pytest.mark.distributed
def test_fsdp_two_ranks_match_one_process_and_checkpoint_resumes_in_one_process(runs):
    train_two_ranks(
        _overrides(runs, "fsdp", train__micro_batch_size=2, parallel__strategy="fsdp", checkpoint__save_every=2)
    )
    assert_same_steps(runs / "fsdp", runs / "one", range(1, STEPS + 1))

    checkpoint = runs / "fsdp" / "checkpoint-2"
    assert sorted(p.name for p in (checkpoint / "distributed").iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    # The gathered export holds the full model: the same tensors as the one-process checkpoint of step 2.
    from safetensors.torch import load_file

    sharded_export = load_file(checkpoint / "model.safetensors")
    one_process = load_file(runs / "one" / "checkpoint-2" / "model.safetensors")
    assert sharded_export.keys() == one_process.keys()
    for name, tensor in one_process.items():
        assert sharded_export[name].shape == tensor.shape
        # Adam's first steps move near-zero-gradient weights by about lr whatever the gradient's size, so
        # rounding-level gradient differences show up here as 1e-6-level relative weight differences.
        assert ((sharded_export[name] - tensor).norm() / tensor.norm()).item() <= 1e-4, name

    # The 2-rank checkpoint, resumed without any process group, continues with the uninterrupted losses.
    train_one_process(
        _overrides(runs, "fsdp-resumed", train__micro_batch_size=4, checkpoint__resume_from=str(checkpoint))
    )
    assert_same_steps(runs / "fsdp-resumed", runs / "one", range(3, STEPS + 1))


@pytest.mark.distributed
def test_one_process_checkpoint_resumes_on_two_fsdp_ranks(runs):
    train_two_ranks(
        _overrides(
            runs,
            "one-resumed-fsdp",
            train__micro_batch_size=2,
            parallel__strategy="fsdp",
            checkpoint__resume_from=str(runs / "one" / "checkpoint-2"),
        )
    )
    assert_same_steps(runs / "one-resumed-fsdp", runs / "one", range(3, STEPS + 1))


DYING_ASYNC_SAVE = """
import os, sys, torch
import trainer.checkpoint as ck
from trainer import Trainer, load_config

real_save = torch.save
def dying_save(obj, path, *args, **kwargs):
    real_save(obj, path, *args, **kwargs)
    if "checkpoint-4" in str(path):
        os._exit(9)  # rank 0 dies while its thread writes checkpoint-4, after every shard is written
if os.environ["RANK"] == "0":
    ck.torch.save = dying_save
Trainer(load_config(None, sys.argv[1:])).train()
"""


@pytest.mark.distributed
def test_async_saves_under_fsdp_resume_exactly_and_a_kill_leaves_the_previous_checkpoint(runs):
    async_fsdp = dict(
        train__micro_batch_size=2, parallel__strategy="fsdp", checkpoint__save_every=2, checkpoint__async_save=True
    )
    train_two_ranks(_overrides(runs, "fsdp-async", **async_fsdp))
    run = runs / "fsdp-async"
    assert_same_steps(run, runs / "one", range(1, STEPS + 1))
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]
    assert not list(run.glob(".tmp-*"))  # every background save finished and was renamed
    train_one_process(
        _overrides(
            runs, "fsdp-async-resumed", train__micro_batch_size=4, checkpoint__resume_from=str(run / "checkpoint-4")
        )
    )
    assert_same_steps(runs / "fsdp-async-resumed", runs / "one", range(5, STEPS + 1))

    script = runs / "dying_async_save.py"
    script.write_text(DYING_ASYNC_SAVE)
    result = torchrun([str(script), *_overrides(runs, "fsdp-async-killed", **async_fsdp)])
    assert result.returncode != 0
    killed = runs / "fsdp-async-killed"
    assert (killed / ".tmp-checkpoint-4" / "distributed" / ".metadata").is_file()  # the shards were complete
    assert [p.name for p in killed.glob("checkpoint-*")] == ["checkpoint-2"]
    train_one_process(
        _overrides(runs, "fsdp-async-killed", train__micro_batch_size=4, checkpoint__resume_from="latest")
    )
    assert_same_steps(killed, runs / "one", range(1, STEPS + 1))


@pytest.mark.distributed
def test_ddp_two_ranks_with_accumulation_match_one_process(runs):
    # 2 ranks x 2 micro-batches of 1 (no_sync on the first) against 1 x 4.
    train_two_ranks(
        _overrides(runs, "ddp", train__micro_batch_size=1, train__grad_accum_steps=2, parallel__strategy="ddp")
    )
    assert_same_steps(runs / "ddp", runs / "one", range(1, STEPS + 1))


FAILING_SCRIPT = """
import os, sys
from pathlib import Path
from tests.helpers import tiny_config
from trainer import Trainer, load_config
from trainer.callbacks import TrainerCallback

class FailOnRankOne(TrainerCallback):
    def on_step_end(self, config, state, control, **kwargs):
        if os.environ["RANK"] == "1" and state.step == 2:
            raise RuntimeError("injected failure on rank 1 at step 2")

Trainer(tiny_config(Path(sys.argv[1]), parallel__strategy="fsdp", train__max_steps=500),
        callbacks=[FailOnRankOne()]).train()
"""


@pytest.mark.distributed
def test_failure_on_one_rank_stops_every_rank_with_the_error_shown(tmp_path):
    write_corpus(tmp_path / "corpus")  # before the ranks start, so no rank reads a file another is writing
    script = tmp_path / "fail_on_rank_one.py"
    script.write_text(textwrap.dedent(FAILING_SCRIPT))
    start = time.perf_counter()
    # Rank 0 would wait forever in the next step's collectives if nothing stopped it; the timeout turns a hang into
    # a test failure (subprocess.TimeoutExpired).
    result = torchrun([str(script), str(tmp_path)], timeout=90)
    elapsed = time.perf_counter() - start
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "RuntimeError: injected failure on rank 1 at step 2" in output
    steps_done = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert max(steps_done, default=0) < 10, f"rank 0 went on training after rank 1 failed: {steps_done}"
    assert elapsed < 90


# ---------------------------------------------------------------- compile and activation checkpointing


def losses_of(tmp_path: Path, name: str, **overrides) -> list[tuple[float, float]]:
    cfg = tiny_config(tmp_path, train__output_dir=str(tmp_path / name), train__max_steps=3, **overrides)
    Trainer(cfg).train()
    return [(r["loss"], r["grad_norm"]) for r in step_records(tmp_path / name).values()]


def assert_close(got, want):
    for (loss, norm), (loss_ref, norm_ref) in zip(got, want, strict=True):
        assert math.isclose(loss, loss_ref, rel_tol=RTOL) and math.isclose(norm, norm_ref, rel_tol=RTOL), (got, want)


def test_full_and_selective_checkpointing_equal_none(tmp_path):
    eager = losses_of(tmp_path, "none")
    assert_close(losses_of(tmp_path, "full", parallel__activation_checkpointing="full"), eager)
    assert_close(losses_of(tmp_path, "selective", parallel__activation_checkpointing="selective"), eager)


def test_compile_per_block_equals_eager(tmp_path):
    # One block keeps the CPU compile (C++ codegen) short.
    eager = losses_of(tmp_path, "eager", model__n_layers=1)
    torch._dynamo.reset()
    compiled = losses_of(tmp_path, "compiled", model__n_layers=1, parallel__compile=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    assert_close(compiled, eager)


class CountOps(TorchDispatchMode):
    """Counts the aten ops that actually run (an op the selective policy saved is not run again)."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def backward_op_counts(mode: str) -> dict[str, int]:
    torch.manual_seed(0)
    model = build("tiny", vocab_size=257, seed=0)
    apply_activation_checkpointing(model, mode)
    input_ids = torch.randint(0, 257, (2, 16))
    loss = model(input_ids, labels=input_ids)
    with CountOps() as counter:
        loss.backward()
    return counter.counts


def test_checkpointing_modes_recompute_what_they_say():
    none, full, selective = (backward_op_counts(m) for m in ("none", "full", "selective"))
    matmuls = lambda counts: counts.get("mm", 0) + counts.get("addmm", 0) + counts.get("bmm", 0)  # noqa: E731
    # full runs each block's projections again in backward: all but down_proj, whose output backward never
    # needs (the recompute stops early), so 6 per block for the tiny model's 2; selective kept their outputs.
    assert matmuls(full) == matmuls(none) + 6 * 2
    assert matmuls(selective) == matmuls(none)
    # ...but selective does recompute the elementwise work (norms, RoPE, SwiGLU).
    assert sum(selective.values()) > sum(none.values())


# ---------------------------------------------------------------- refused settings


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"parallel__strategy": "fsdp", "train__dtype": "fp16"}, "does not support train.dtype=fp16"),
        ({"parallel__fsdp_cpu_offload": True}, "needs parallel.strategy=fsdp"),
        ({"parallel__strategy": "ddp", "optim__name": "adamw_layerwise"}, "inside backward"),
        ({"parallel__strategy": "fsdp", "optim__name": "galore_adamw"}, "needs optim.name=adamw"),
        ({"parallel__activation_checkpointing": "some"}, "choose one of: none, full, selective"),
    ],
)
def test_unsupported_settings_are_refused(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, **overrides)


def test_several_processes_without_a_strategy_are_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="parallel.strategy=none"):
        init_distributed("none", torch.device("cpu"))


@pytest.mark.distributed
def test_signal_to_one_rank_stops_both_at_the_same_step_with_a_checkpoint(tmp_path):
    """Preemption often reaches one process first: every rank must still save the same step."""
    write_corpus(tmp_path / "corpus")
    args = _overrides(tmp_path, "run", train__max_steps=100000, parallel__strategy="fsdp", train__micro_batch_size=2)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "trainer",
        "train",
        *args,
    ]
    agent = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = tmp_path / "run"
    deadline = time.time() + RUN_TIMEOUT_S
    while time.time() < deadline and len(step_records(run)) < 3:
        time.sleep(0.2)
    workers = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[-1]), 15)  # SIGTERM to one rank only
    output, _ = agent.communicate(timeout=RUN_TIMEOUT_S)  # a hang fails here
    last = max(step_records(run))
    checkpoint = run / f"checkpoint-{last}"
    assert (checkpoint / "trainer_state.json").is_file(), output[-3000:]
    assert "stopped at step" in output
    state = Trainer(
        load_config(
            None,
            _overrides(
                tmp_path, "run", train__max_steps=last + 1, checkpoint__resume_from="latest", train__micro_batch_size=4
            ),
        )
    ).train()
    assert state.step == last + 1


READ_COUNTER = textwrap.dedent(
    """
    import json, os, sys
    import safetensors
    import trainer.models.hf as hf
    import trainer.parallel.materialize as materialize
    from trainer.build import build_run
    from trainer.config import load_config

    read = {"bytes": 0}

    class Counting:
        # safe_open, counting the bytes of every tensor (or slice of one) it hands out
        def __init__(self, *args, **kwargs):
            self.inner = safetensors.safe_open(*args, **kwargs)
        def __enter__(self):
            self.inner.__enter__()
            return self
        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)
        def keys(self):
            return self.inner.keys()
        def get_tensor(self, name):
            t = self.inner.get_tensor(name)
            read["bytes"] += t.numel() * t.element_size()
            return t
        def get_slice(self, name):
            inner = self.inner.get_slice(name)
            class Slice:
                def get_shape(self):
                    return inner.get_shape()
                def __getitem__(self, index):
                    t = inner[index]
                    read["bytes"] += t.numel() * t.element_size()
                    return t
            return Slice()

    hf.safe_open = materialize.safe_open = Counting
    build_run(load_config(None, sys.argv[2:]))
    rank = os.environ["RANK"]
    open(os.path.join(sys.argv[1], f"read-{rank}.json"), "w").write(json.dumps(read))
    """
)


@pytest.mark.distributed
@pytest.mark.parametrize(
    "strategy, extra, most",
    [
        ("fsdp", {}, 0.6),
        ("fsdp", {"parallel__tensor_parallel": 2}, 0.6),
        ("fsdp", {"lora__rank": 4}, 0.6),
        ("ddp", {}, None),
    ],
)
def test_an_fsdp_rank_reads_only_its_part_of_the_checkpoint(tmp_path, strategy, extra, most):
    """Under FSDP2 (LoRA's base included) or tensor parallelism the model is never whole on a rank:
    each reads about half of a 2-rank run's checkpoint (its part of each tensor); under DDP each
    reads all of it."""
    from tests.test_hf import hf_folder

    _, folder = hf_folder(tmp_path, "llama", vocab_size=320, hidden_size=64, intermediate_size=176)
    checkpoint = (folder / "model.safetensors").stat().st_size
    write_corpus(tmp_path / "corpus")
    args = _overrides(
        tmp_path,
        strategy,
        model__from_hf=str(folder),
        model__preset="small",
        model__allow_new_tokenizer="true",
        parallel__strategy=strategy,
        **extra,
    )
    script = tmp_path / "count_reads.py"
    script.write_text(READ_COUNTER)
    result = torchrun([str(script), str(tmp_path), *args])
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    for rank in (0, 1):
        read = json.loads((tmp_path / f"read-{rank}.json").read_text())["bytes"]
        if most is None:
            assert read >= 0.95 * checkpoint
        else:
            assert 0.3 * checkpoint < read <= most * checkpoint


@pytest.mark.distributed
def test_two_nodes_on_one_machine_stop_together_on_sigterm_and_resume(tmp_path):
    """The multi-node recipe rehearsed: two torchrun agents (--nnodes 2, one process each) meet by
    c10d rendezvous on 127.0.0.1; SIGTERM to node 1's worker stops both at the same step with a
    checkpoint, which resumes."""
    import socket

    write_corpus(tmp_path / "corpus")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = _overrides(tmp_path, "run", train__max_steps=100000, parallel__strategy="fsdp", train__micro_batch_size=2)
    agents = []
    for node in (0, 1):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"]
        command += ["--node_rank", str(node), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}"]
        command += ["--rdzv_id", "rehearsal", "-m", "trainer", "train", *args]
        agents.append(
            subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    run = tmp_path / "run"
    deadline = time.time() + RUN_TIMEOUT_S
    while time.time() < deadline and len(step_records(run)) < 3:
        time.sleep(0.2)
    workers = subprocess.run(["pgrep", "-P", str(agents[1].pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 1
    os.kill(int(workers[0]), 15)  # SIGTERM to the second node's process only
    outputs = [agent.communicate(timeout=RUN_TIMEOUT_S)[0] for agent in agents]  # a hang fails here
    # a stopped run exits 128 + SIGTERM on every rank, as a process a scheduler stopped should
    # (trainer/cli.py), so that a requeueing scheduler sees the preemption; each agent reports it
    for agent, output in zip(agents, outputs):
        assert agent.returncode != 0 and "exitcode: 143" in output and "exitcode: 1 " not in output, output[-3000:]
    last = max(step_records(run))
    assert (run / f"checkpoint-{last}" / "trainer_state.json").is_file(), outputs[0][-3000:]
    assert "stopped at step" in outputs[0]
    state = Trainer(
        load_config(
            None,
            _overrides(
                tmp_path, "run", train__max_steps=last + 1, checkpoint__resume_from="latest", train__micro_batch_size=4
            ),
        )
    ).train()
    assert state.step == last + 1
