"""Memory-lean optimizers (trainer/optim): training, GaLore and APOLLO updates, state round trip, resume,
layer-wise."""

import copy
import dataclasses
import io
import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from tests.helpers import StopAt, tiny_config
from trainer import Trainer
from trainer.config import OptimConfig
from trainer.errors import ConfigError, TrainerError
from trainer.metrics import read_metrics
from trainer.models import build
from trainer.models.config import ModelArgs
from trainer.optim import build_optimizer, optimizer_names, state_bytes

NAMES = optimizer_names()
GALORE = [n for n in NAMES if n.startswith("galore_")]
# Rank 8 with a new projection every 2 steps: the resume and round-trip tests cross a refresh.
LOW_RANK = dict(galore_rank=8, galore_update_proj_gap=2, apollo_rank=8, apollo_update_proj_gap=2)


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is several times faster than two on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def options(name, **overrides):
    """tiny_config overrides for `name`: layer-wise runs cannot clip; rank 8 with a projector refresh every 2 steps."""
    values = dict(optim__name=name, optim__lr=3e-3, train__threads=1, **{f"optim__{k}": v for k, v in LOW_RANK.items()})
    if name.endswith("_layerwise"):
        values["train__max_grad_norm"] = 0
    return {**values, **overrides}


def optim_config(name, **overrides) -> OptimConfig:
    values = dict(name=name, lr=1e-2, weight_decay=0.0, **LOW_RANK)
    return dataclasses.replace(OptimConfig(), **{**values, **overrides})


def loss_of(model, seed=0):
    ids = torch.randint(0, model.args.vocab_size, (2, 17), generator=torch.Generator().manual_seed(seed))
    return model(ids[:, :-1], labels=ids[:, 1:])


def train_steps(model, optimizer, steps, first_seed=0):
    for step in range(steps):
        loss_of(model, first_seed + step).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def tiny_model(dtype=torch.float32):
    return build("tiny", vocab_size=257, seed=0).to(dtype)


def step_records(run_dir):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def test_config_offers_exactly_the_factory_names():
    field = next(f for f in dataclasses.fields(OptimConfig) if f.name == "name")
    assert sorted(field.metadata["choices"]) == sorted(NAMES)
    assert len(NAMES) == 14


@pytest.mark.parametrize("name", NAMES)
def test_trains_and_resumes_exactly(tmp_path, name):
    common = options(name, train__max_steps=6, checkpoint__save_every=3, train__eval_batches=1)
    Trainer(tiny_config(tmp_path, train__output_dir=str(tmp_path / "a"), **common)).train()
    uninterrupted = step_records(tmp_path / "a")
    assert uninterrupted[-1]["loss"] < uninterrupted[0]["loss"] - 0.3  # it learns
    first = uninterrupted[0]
    assert first["optim_state_bytes"] > 0
    if name.endswith("_layerwise"):  # one parameter's gradient at a time, not all of them
        assert first["grad_bytes"] < first["param_bytes"] / 4

    Trainer(tiny_config(tmp_path, train__output_dir=str(tmp_path / "b"), **common), callbacks=[StopAt(3)]).train()
    Trainer(
        tiny_config(tmp_path, train__output_dir=str(tmp_path / "b"), checkpoint__resume_from="latest", **common)
    ).train()
    resumed = step_records(tmp_path / "b")
    # Exact: a projector refresh (every 2 steps) and the 8-bit states all continue as if uninterrupted.
    assert [(r["step"], r["loss"]) for r in resumed] == [(r["step"], r["loss"]) for r in uninterrupted]


@pytest.mark.parametrize("name", NAMES)
def test_bf16_parameters(tmp_path, name):
    Trainer(
        tiny_config(
            tmp_path,
            train__param_dtype="bf16",
            train__dtype="bf16",
            train__max_steps=3,
            train__eval_batches=1,
            **options(name),
        )
    ).train()
    losses = [r["loss"] for r in step_records(tmp_path / "run")]
    assert len(losses) == 3 and all(loss == loss and loss < 10 for loss in losses)


@pytest.mark.parametrize("name,rank", [(n, 8) for n in GALORE] + [("galore_adamw8bit", 40)])
def test_galore_targeted_weights_change_every_step(name, rank):
    # Rank 8 keeps the projected gradients under bitsandbytes' 8-bit size threshold (4096 elements),
    # where galore-torch's positional max_unorm clips the update to nothing; rank 40 takes the 8-bit path.
    model = tiny_model()
    optimizer = build_optimizer(model, optim_config(name, galore_rank=rank))  # no weight decay: moves are updates
    targeted = {n: p for n, p in model.named_parameters() if ("self_attn" in n or "mlp" in n)}
    assert len(targeted) == 14
    for step in range(3):  # the projector is refreshed at steps 0 and 2
        before = {n: p.detach().clone() for n, p in targeted.items()}
        loss_of(model, step).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for n, p in targeted.items():
            assert not torch.equal(p, before[n]), f"{n} stood still at step {step}"


def test_galore_state_is_smaller_than_adamw_state():
    sizes = {}
    for name in ("adamw", "galore_adamw"):
        model = tiny_model()
        optimizer = build_optimizer(model, optim_config(name))
        train_steps(model, optimizer, 1)
        sizes[name] = state_bytes(optimizer)
    assert sizes["galore_adamw"] < sizes["adamw"] / 2


@pytest.mark.parametrize("name", NAMES)
def test_state_round_trips_through_weights_only_load(name):
    model = tiny_model()
    optimizer = build_optimizer(model, optim_config(name))
    for step in range(2):
        loss_of(model, step).backward()
        optimizer.step()  # a no-op for layer-wise optimizers: backward already stepped them
        optimizer.zero_grad(set_to_none=True)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    twin = copy.deepcopy(model)
    twin_optimizer = build_optimizer(twin, optim_config(name))
    twin_optimizer.load_state_dict(saved)
    for m, o in ((model, optimizer), (twin, twin_optimizer)):
        loss_of(m, 2).backward()  # step 2 refreshes the GaLore projector
        o.step()
        o.zero_grad(set_to_none=True)
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), n


def _checkpointed(model):
    """Recomputes each block in backward, the non-reentrant way trainer/parallel does it."""
    for block in model.model.layers:
        forward = block.forward
        block.forward = lambda *args, _forward=forward, **kwargs: checkpoint(
            _forward, *args, use_reentrant=False, **kwargs
        )
    return model


@pytest.mark.parametrize("activation_checkpointing", [False, True])
def test_layerwise_adamw_step_equals_adamw_step(activation_checkpointing):
    reference = tiny_model()
    layerwise = copy.deepcopy(reference)
    if activation_checkpointing:
        _checkpointed(layerwise)
    reference_optimizer = build_optimizer(reference, optim_config("adamw", weight_decay=0.1))
    layerwise_optimizer = build_optimizer(layerwise, optim_config("adamw_layerwise", weight_decay=0.1))

    loss_of(reference).backward()
    expected_norm = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()])
    reference_optimizer.step()
    loss_of(layerwise).backward()  # the update happens here
    assert all(p.grad is None for p in layerwise.parameters())
    torch.testing.assert_close(layerwise_optimizer.grad_norm(), expected_norm, rtol=1e-6, atol=0)
    for (n, p), q in zip(reference.named_parameters(), layerwise.parameters()):
        assert (q - p).norm() / p.norm() < 1e-6, n


def test_layerwise_lr_follows_the_schedule_once_per_step(tmp_path):
    Trainer(tiny_config(tmp_path, train__max_steps=4, optim__warmup_steps=2, **options("adamw_layerwise"))).train()
    plain = tmp_path / "plain"
    Trainer(
        tiny_config(
            tmp_path, train__output_dir=str(plain), train__max_steps=4, optim__warmup_steps=2, **options("adamw")
        )
    ).train()
    assert [r["lr"] for r in step_records(tmp_path / "run")] == [r["lr"] for r in step_records(plain)]


def test_layerwise_nonfinite_step_stops_the_run(tmp_path):
    with pytest.raises(TrainerError, match="cannot be skipped"):
        Trainer(
            tiny_config(
                tmp_path, train__max_steps=4, **options("adamw_layerwise", optim__lr=1e20, optim__warmup_steps=0)
            )
        ).train()


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        (dict(optim__name="galore_sgd"), r"optim\.name='galore_sgd' is not allowed; choose one of: adamw, "),
        (dict(optim__name="galore_adamw", optim__galore_rank=0), r"optim\.galore_rank must be > 0"),
        (dict(optim__name="galore_adamw", optim__galore_update_proj_gap=0), r"galore_update_proj_gap must be > 0"),
        (dict(optim__name="galore_adamw", optim__galore_scale=-1), r"galore_scale must be > 0"),
        (dict(optim__name="galore_adamw", optim__galore_proj_type="diagonal"), r"galore_proj_type='diagonal' is not"),
        (
            dict(optim__name="galore_adamw", optim__galore_target="(q_proj"),
            r"galore_target='\(q_proj' is not a valid regex",
        ),
        (dict(optim__betas="1.0,0.9"), r"optim\.betas must both be in \[0, 1\)"),
        (dict(optim__eps=0), r"optim\.eps must be > 0"),
        (dict(optim__name="adamw_layerwise"), r"cannot clip; set train\.max_grad_norm=0"),
        (
            dict(optim__name="adamw_layerwise", train__max_grad_norm=0, train__grad_accum_steps=2),
            r"cannot accumulate.*set train\.grad_accum_steps=1",
        ),
        (
            dict(optim__name="adamw_layerwise", train__max_grad_norm=0, train__dtype="fp16"),
            r"fp16.*use train\.dtype=bf16",
        ),
        (dict(optim__name="galore_adamw", parallel__strategy="ddp"), r"galore_adamw with parallel\.strategy=ddp"),
        (
            dict(optim__name="adamw_layerwise", train__max_grad_norm=0, parallel__strategy="ddp"),
            r"adamw_layerwise.*parallel\.strategy=ddp",
        ),
        (dict(optim__name="adamw8bit", parallel__strategy="fsdp"), r"parallel\.strategy=fsdp.*adamw8bit"),
    ],
)
def test_bad_values_are_refused_clearly(tmp_path, overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        tiny_config(tmp_path, **overrides)


def test_galore_target_matching_nothing_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="galore_target='attention' matches no linear layer.*q_proj"):
        Trainer(tiny_config(tmp_path, optim__name="galore_adamw", optim__galore_target="attention")).train()


def test_rank_larger_than_a_matrix_is_clamped_with_a_warning():
    model = tiny_model()
    with pytest.warns(UserWarning, match=r"galore_rank=100 is larger.*clamped.*\(64, 128\)"):
        optimizer = build_optimizer(model, optim_config("galore_adamw", galore_rank=100))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_steps(model, optimizer, 1)
    k_proj = model.model.layers[0].self_attn.k_proj.weight
    assert optimizer.state[k_proj]["projector"].shape == (64, 64)  # left side of a 64 x 128 matrix, rank 64


# ---------------------------------------------------------------- APOLLO


def odd_model(dtype=torch.float64):
    """Matrices of both orientations, none square of a round size: 20 x 40 (k/v), 72 x 40 (gate/up), 40 x 72 (down)."""
    args = ModelArgs(
        vocab_size=61, hidden_size=40, intermediate_size=72, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32
    )
    return build(args, seed=0).to(dtype)


@pytest.mark.parametrize("scale_type,scale", [("channel", 1.0), ("tensor", 128.0)])
def test_apollo_steps_equal_apollo_torch_steps(scale_type, scale):
    """apollo-torch's APOLLOAdamW is the reference: same groups, seeds and settings, fp64, across two refreshes."""
    apollo_torch = pytest.importorskip("apollo_torch")
    model = odd_model()
    twin = copy.deepcopy(model)
    cfg = optim_config(
        "apollo_adamw", weight_decay=0.1, apollo_rank=6, apollo_scale_type=scale_type, apollo_scale=scale
    )
    ours = build_optimizer(model, cfg)
    twin_params = dict(twin.named_parameters())
    name_of = {p: n for n, p in model.named_parameters()}
    groups = []
    for group in ours.param_groups:
        twin_group = {
            "params": [twin_params[name_of[p]] for p in group["params"]],
            "weight_decay": group["weight_decay"],
        }
        if "apollo_rank" in group:
            twin_group.update(
                rank=6, proj="random", scale_type=scale_type, update_proj_gap=2, scale=scale, proj_type="std"
            )
        groups.append(twin_group)
    assert len(groups) == 3 and len(groups[2]["params"]) == 14
    reference = apollo_torch.APOLLOAdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    for step in range(5):
        for m, o in ((model, ours), (twin, reference)):
            loss_of(m, step).backward()
            o.step()
            o.zero_grad(set_to_none=True)
        for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
            assert (p - q).norm() <= 1e-12 * q.norm(), f"{n} at step {step}"
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, odd_model().get_parameter(n))]
    assert len(moved) == len(list(model.parameters()))


def test_apollo_layerwise_steps_equal_apollo_steps():
    """One optimizer per parameter draws the same projections as one for the model (seeds are model-wide)."""
    reference, layerwise = odd_model(torch.float32), odd_model(torch.float32)
    reference_optimizer = build_optimizer(reference, optim_config("apollo_adamw", weight_decay=0.1))
    build_optimizer(layerwise, optim_config("apollo_adamw_layerwise", weight_decay=0.1))
    for step in range(3):  # a refresh at step 2
        loss_of(reference, step).backward()
        reference_optimizer.step()
        reference_optimizer.zero_grad(set_to_none=True)
        loss_of(layerwise, step).backward()
    for (n, p), q in zip(reference.named_parameters(), layerwise.parameters(), strict=True):
        assert (q - p).norm() / p.norm() < 1e-6, n


def test_apollo_state_is_far_smaller_than_adamw_state():
    sizes = {}
    for name in ("adamw", "apollo_adamw"):
        model = tiny_model()
        optimizer = build_optimizer(model, optim_config(name))
        train_steps(model, optimizer, 1)
        sizes[name] = state_bytes(optimizer)
    # tiny: 14 targeted matrices of 2 x 128 x (64..352) moments each under AdamW; rank 8 keeps 2 x 8 x (64..352).
    matrices = sum(p.numel() for n, p in tiny_model().named_parameters() if "self_attn" in n or "mlp" in n)
    assert sizes["adamw"] - sizes["apollo_adamw"] > 0.8 * 2 * 4 * matrices


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        (dict(optim__name="apollo_adamw", optim__apollo_rank=0), r"optim\.apollo_rank must be > 0"),
        (dict(optim__name="apollo_adamw", optim__apollo_update_proj_gap=0), r"apollo_update_proj_gap must be > 0"),
        (dict(optim__name="apollo_adamw", optim__apollo_scale=0), r"apollo_scale must be > 0"),
        (dict(optim__name="apollo_adamw", optim__apollo_scale_type="row"), r"apollo_scale_type='row' is not allowed"),
        (dict(optim__name="apollo_adamw", optim__apollo_target="(q_proj"), r"apollo_target='\(q_proj' is not a valid"),
        (
            dict(optim__name="apollo_adamw", parallel__strategy="fsdp"),
            r"parallel\.strategy=fsdp needs optim\.name=adamw",
        ),
        (dict(optim__name="apollo_adamw_layerwise"), r"cannot clip; set train\.max_grad_norm=0"),
    ],
)
def test_bad_apollo_values_are_refused_clearly(tmp_path, overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        tiny_config(tmp_path, **overrides)


def test_apollo_target_matching_nothing_is_refused():
    with pytest.raises(ConfigError, match="apollo_target='attention' matches no linear layer.*q_proj"):
        build_optimizer(tiny_model(), optim_config("apollo_adamw", apollo_target="attention"))


APOLLO_DDP_CHECK = """
import copy, dataclasses, os, sys
import torch, torch.distributed as dist
from trainer.config import OptimConfig
from trainer.models import build
from trainer.optim import build_optimizer
from trainer.parallel.fsdp import apply_ddp

dist.init_process_group("gloo")
rank = dist.get_rank()
cfg = dataclasses.replace(OptimConfig(), name="apollo_adamw", lr=1e-2, weight_decay=0.1, apollo_rank=8,
                          apollo_update_proj_gap=2)
model = build("tiny", vocab_size=257, seed=0)
reference = copy.deepcopy(model)
reference_optimizer = build_optimizer(reference, cfg)
ddp = apply_ddp(model, torch.device("cpu"))
optimizer = build_optimizer(model, cfg)
for step in range(3):  # a projection refresh at step 2
    ids = torch.randint(0, 257, (4, 17), generator=torch.Generator().manual_seed(step))
    reference(ids[:, :-1], labels=ids[:, 1:]).backward()
    reference_optimizer.step()
    reference_optimizer.zero_grad(set_to_none=True)
    half = ids[2 * rank:2 * rank + 2]  # equal token counts: the ranks' mean gradients average to the whole's
    ddp(half[:, :-1], labels=half[:, 1:]).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
    assert (p - q).norm() <= 1e-5 * q.norm(), name
    other = p.detach().clone()
    dist.broadcast(other, src=0)
    assert torch.equal(other, p), name  # every rank holds the same weights
open(f"{sys.argv[1]}/rank{rank}.ok", "w").close()  # a file per rank: printed lines can interleave
dist.barrier()  # gloo aborts a process that exits while its peer still has messages in flight
dist.destroy_process_group()
# Skips interpreter finalization, where a DDP run once aborted after passing ('terminate called without
# an active exception', SIGABRT): the results are already written.
os._exit(0)
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_apollo_under_ddp_equals_one_process(tmp_path):
    """Every rank draws the same projections and sees the same averaged gradient, so DDP is allowed."""
    from tests.test_parallel import torchrun

    script = tmp_path / "check.py"
    script.write_text(APOLLO_DDP_CHECK)
    run = torchrun([str(script), str(tmp_path)], timeout=150)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert all((tmp_path / f"rank{rank}.ok").exists() for rank in (0, 1))
