"""parallel.tensor_parallel: the vocabulary-parallel loss and the split model against one process in
fp64 on 2 CPU ranks (gloo), whole runs (TP 2; TP 2 x FSDP 2 on 4 ranks) against one process step by
step, checkpoints resumed across mesh shapes, the same initial weights on every mesh, and the
settings it refuses."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_config, write_corpus
from tests.test_parallel import REPO, STEPS, _env, _overrides, assert_same_steps, train_one_process
from trainer.errors import ConfigError
from trainer.models.config import ModelArgs
from trainer.parallel.tensor_parallel import check_tensor_parallel

RUN_TIMEOUT_S = 240


def torchrun(nproc: int, args: list[str]) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    result = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


# Runs on 2 ranks; every check raises on failure. Uninitialised memory is filled with NaN, so an
# output the op forgets to write shows.
PARITY_SCRIPT = textwrap.dedent(
    """
    import copy
    import torch, torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.tensor import DTensor
    from trainer.models import build
    from trainer.models.config import ModelArgs
    from trainer.ops.vocab_parallel_cross_entropy import vocab_parallel_cross_entropy
    from trainer.parallel.distributed import data_and_tensor_mesh
    from trainer.parallel.tensor_parallel import apply_tensor_parallel

    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    def close(got, want, what, tol=1e-10):
        err = ((got - want).norm() / want.norm()).item()
        assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"

    # The loss op alone: 37 tokens (two chunks of 24 and 13), hidden 19, vocabulary 2 x 29, some
    # labels ignored, with and without a softcap, against F.cross_entropy on the whole logits.
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 19, dtype=torch.float64, generator=g)
    weight = torch.randn(58, 19, dtype=torch.float64, generator=g)
    labels = torch.randint(0, 58, (37,), generator=g)
    labels[[0, 5, 36]] = -100
    rows = slice(29 * rank, 29 * (rank + 1))
    token_weights = torch.linspace(0.5, 1.5, 37, dtype=torch.float64)
    # spread 300: logits thousands apart, whose exponentials underflow (the op raises their arguments)
    cases = ((None, "none", 1.0), (3.0, "none", 1.0), (None, "sum", 1.0), (3.0, "sum", 1.0), (None, "sum", 300.0))
    for softcap, reduction, spread in cases:
        h = (hidden * spread).requires_grad_()
        w = weight[rows].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(
            h, w, labels, vocab_start=rows.start, group=dist.group.WORLD, softcap=softcap, reduction=reduction
        )
        # per-token weights reach "none"'s backward; "sum" made its gradients in forward, scaled by 0.7 here
        if reduction == "none":
            (loss * token_weights).sum().backward()
        else:
            (loss * 0.7).backward()
        grad_h = h.grad.clone()
        dist.all_reduce(grad_h)  # each rank's part of the hidden states' gradient
        h_ref = (hidden * spread).requires_grad_()
        w_ref = weight.clone().requires_grad_()
        logits = h_ref @ w_ref.T
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        want = F.cross_entropy(logits, labels, reduction="none")
        if reduction == "none":
            (want * token_weights).sum().backward()
            assert (loss[[0, 5, 36]] == 0).all()
        else:
            want = want.sum()
            (want * 0.7).backward()
        close(loss, want, f"loss, softcap {softcap}, {reduction}")
        close(grad_h, h_ref.grad, f"hidden gradient, softcap {softcap}, {reduction}")
        close(w.grad, w_ref.grad[rows], f"weight gradient, softcap {softcap}, {reduction}")

    # The whole model, split over the 2 ranks, against itself in one process: loss, every gradient
    # and the logits. Norms perturbed from 1, so a norm applied twice or not at all shows.
    families = {
        "llama": {},
        "qwen3 (per-head q/k norms, tied embeddings)": dict(qk_norm="head", tie_embeddings=True),
        "gemma2 (sandwich norms, softcaps, embedding scale)": dict(
            norm_placement="sandwich", norm_offset=1.0, norm_cast="gemma", embed_scale=True,
            attn_softcap=5.0, final_softcap=3.0, mlp_activation="gelu_tanh", head_dim=16,
            query_pre_attn_scalar=24.0,
        ),
        "olmo2-like (norms after attention and MLP)": dict(norm_placement="post"),
    }
    ids = torch.randint(0, 96, (2, 16), generator=g)
    labels = torch.randint(0, 96, (2, 16), generator=g)
    labels[0, :3] = -100
    documents = torch.tensor([[0] * 9 + [1] * 7, [0] * 16])  # packed rows: attention stays in its document
    positions = torch.cat([torch.arange(9), torch.arange(7)]).expand(2, 16).contiguous()
    mesh = data_and_tensor_mesh("cpu", world, world)["tp"]
    for name, extra in families.items():
        args = ModelArgs(vocab_size=96, hidden_size=64, intermediate_size=96, n_layers=2, n_heads=4, n_kv_heads=2,
                         max_seq_len=64, **extra)
        one = build(args, seed=0).double()
        with torch.no_grad():
            for n, p in one.named_parameters():
                if "norm" in n:
                    p.add_(torch.randn(p.shape, dtype=p.dtype, generator=g) * 0.1)
        split = copy.deepcopy(one)
        apply_tensor_parallel(split, mesh)
        for kwargs in ({}, dict(position_ids=positions, document_ids=documents)):
            one.zero_grad(); split.zero_grad()
            want = one(ids, labels=labels, reduction="sum", **kwargs)
            want.backward()
            got = split(ids, labels=labels, reduction="sum", **kwargs)
            got.backward()
            close(got, want, f"{name} loss {kwargs.keys()}")
            for (n, p), (_, q) in zip(one.named_parameters(), split.named_parameters(), strict=True):
                grad = q.grad.full_tensor() if isinstance(q.grad, DTensor) else q.grad
                close(grad, p.grad, f"{name} gradient of {n}")
        with torch.no_grad():
            close(split(ids), one(ids), f"{name} logits")
    dist.destroy_process_group()
    print("parity ok")
    """
)


@pytest.mark.distributed
def test_split_loss_and_model_match_one_process_in_fp64(tmp_path):
    script = tmp_path / "parity.py"
    script.write_text(PARITY_SCRIPT)
    torchrun(2, [str(script)])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The one-process reference: micro-batch 4, checkpoints at steps 2 and 4; and the same on 2
    tensor-parallel ranks (each sees the whole batch)."""
    tmp = tmp_path_factory.mktemp("tensor_parallel")
    write_corpus(tmp / "corpus")
    train_one_process(_overrides(tmp, "one", train__micro_batch_size=4, checkpoint__save_every=2))
    tp = dict(parallel__strategy="fsdp", parallel__tensor_parallel=2)
    torchrun(
        2,
        ["-m", "trainer", "train", *_overrides(tmp, "tp2", train__micro_batch_size=4, checkpoint__save_every=2, **tp)],
    )
    return tmp


@pytest.mark.distributed
def test_two_tensor_parallel_ranks_match_one_process_and_resume_on_any_mesh(runs):
    assert_same_steps(runs / "tp2", runs / "one", range(1, STEPS + 1))
    checkpoint = runs / "tp2" / "checkpoint-2"
    assert sorted(p.name for p in (checkpoint / "distributed").iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    # TP 2 -> TP 2 x FSDP 2 on 4 ranks (micro-batch 2 each: the same global batch of 4).
    tp_fsdp = dict(
        parallel__strategy="fsdp", parallel__tensor_parallel=2, train__micro_batch_size=2, checkpoint__save_every=2
    )
    torchrun(
        4,
        ["-m", "trainer", "train", *_overrides(runs, "tp2-fsdp2", checkpoint__resume_from=str(checkpoint), **tp_fsdp)],
    )
    assert_same_steps(runs / "tp2-fsdp2", runs / "one", range(3, STEPS + 1))
    # TP 2 x FSDP 2 -> one process, without any process group.
    train_one_process(
        _overrides(
            runs,
            "one-again",
            train__micro_batch_size=4,
            checkpoint__resume_from=str(runs / "tp2-fsdp2" / "checkpoint-4"),
        )
    )
    assert_same_steps(runs / "one-again", runs / "one", range(5, STEPS + 1))
    # One process -> TP 2: full tensors split on load.
    tp = dict(parallel__strategy="fsdp", parallel__tensor_parallel=2, train__micro_batch_size=4)
    resume_one = str(runs / "one" / "checkpoint-2")
    torchrun(2, ["-m", "trainer", "train", *_overrides(runs, "tp2-from-one", checkpoint__resume_from=resume_one, **tp)])
    assert_same_steps(runs / "tp2-from-one", runs / "one", range(3, STEPS + 1))


INITIAL_WEIGHTS = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    from trainer.build import build_run
    from trainer.config import load_config
    from trainer.parallel.sharded_checkpoint import full_model_state

    from trainer.plan import predict_peak

    config = load_config(None, sys.argv[2:])
    planned = predict_peak(config, world_size=int(os.environ["WORLD_SIZE"]), device="cpu").breakdown["parameters"]
    parts = build_run(config)
    local = sum(p.to_local().numel() * p.element_size() for p in parts.model.parameters())
    state = full_model_state(parts.model)
    if dist.get_rank() == 0:
        torch.save({"state": state, "planned": planned}, sys.argv[1])
    torch.save({"local": local}, sys.argv[1] + f".rank{dist.get_rank()}")
    dist.barrier()
    """
)


@pytest.mark.distributed
def test_initial_weights_are_the_same_on_every_mesh_and_the_planner_counts_each_ranks_part(tmp_path):
    from trainer.build import build_run
    from trainer.config import load_config

    write_corpus(tmp_path / "corpus")
    one = build_run(load_config(None, _overrides(tmp_path, "one", train__micro_batch_size=2))).model.state_dict()
    script = tmp_path / "initial.py"
    script.write_text(INITIAL_WEIGHTS)
    split = tmp_path / "tp2-fsdp2.pt"
    tp_fsdp = dict(parallel__strategy="fsdp", parallel__tensor_parallel=2, train__micro_batch_size=1)
    torchrun(4, [str(script), str(split), *_overrides(tmp_path, "tp2-fsdp2", **tp_fsdp)])
    saved = torch.load(split, weights_only=True)
    gathered = saved["state"]
    assert gathered.keys() == one.keys()
    for name, tensor in one.items():
        assert torch.equal(gathered[name], tensor), name
    # The planner's per-rank parameter bytes (a quarter of the heads', MLP's and vocabulary's, norms
    # halved by FSDP only) against what each rank holds.
    for rank in range(4):
        local = torch.load(f"{split}.rank{rank}", weights_only=True)["local"]
        assert abs(local / saved["planned"] - 1) <= 0.02, (rank, local, saved["planned"])


@pytest.mark.distributed
def test_from_hf_on_two_tensor_parallel_ranks_matches_one_process(tmp_path):
    from tests.test_hf import hf_folder

    _, folder = hf_folder(tmp_path, "qwen3", vocab_size=320)  # per-head q/k norms, tied embeddings
    write_corpus(tmp_path / "corpus")
    hf = dict(
        model__from_hf=str(folder), model__preset="small", model__allow_new_tokenizer="true", train__micro_batch_size=4
    )
    train_one_process(_overrides(tmp_path, "one", **hf))
    tp = dict(parallel__strategy="fsdp", parallel__tensor_parallel=2)
    torchrun(2, ["-m", "trainer", "train", *_overrides(tmp_path, "tp2", **hf, **tp)])
    assert_same_steps(tmp_path / "tp2", tmp_path / "one", range(1, STEPS + 1))


# ---------------------------------------------------------------- refused settings


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"parallel__tensor_parallel": 0}, "must be 1 or more"),
        ({"parallel__tensor_parallel": 2}, "needs parallel.strategy=fsdp"),
        ({"parallel__tensor_parallel": 2, "parallel__strategy": "ddp"}, "needs parallel.strategy=fsdp"),
        ({"parallel__tensor_parallel": 2, "parallel__strategy": "fsdp", "lora__rank": 8}, "lora.rank > 0"),
        ({"parallel__tensor_parallel": 2, "parallel__strategy": "fsdp", "parallel__compile": True}, "compile"),
        ({"parallel__tensor_parallel": 2, "parallel__strategy": "fsdp", "parallel__tiled_mlp": 2}, "tiled_mlp"),
        (
            {"parallel__tensor_parallel": 2, "parallel__strategy": "fsdp", "train__micro_batch_size": "auto"},
            "micro_batch_size=auto",
        ),
    ],
)
def test_settings_tensor_parallelism_cannot_run_with_are_refused(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, **overrides)


SHAPE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, n_layers=2, n_heads=4, n_kv_heads=2)


@pytest.mark.parametrize(
    "degree, world, changes, message",
    [
        (3, 4, {}, "does not divide the 4 ranks"),
        (4, 4, {}, "does not divide the model's 2 key/value heads; choose one of 2"),
        (2, 2, {"n_heads": 6, "n_kv_heads": 3, "hidden_size": 48}, "does not divide the model's 3 key/value heads"),
        (2, 2, {"intermediate_size": 97}, "MLP width"),
        (2, 2, {"vocab_size": 95}, "vocabulary"),
        (2, 2, {"fused_projections": True}, "Phi-3"),
        (2, 2, {"qk_norm": "projection"}, "OLMo 2"),
        (2, 2, {"n_experts": 4, "experts_per_token": 2, "moe_intermediate_size": 32}, "mixture-of-experts"),
    ],
)
def test_a_model_or_world_tensor_parallelism_cannot_split_is_refused(degree, world, changes, message):
    with pytest.raises(ConfigError, match=message):
        check_tensor_parallel(degree, ModelArgs(**{**SHAPE, **changes}), world)


def test_the_world_size_is_checked_before_anything_is_built(tmp_path, monkeypatch):
    from trainer.build import build_run

    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    cfg = tiny_config(tmp_path, parallel__strategy="fsdp", parallel__tensor_parallel=2)
    with pytest.raises(ConfigError, match="does not divide the 3 ranks"):
        build_run(cfg)
    assert not Path(cfg.train.output_dir).exists()
