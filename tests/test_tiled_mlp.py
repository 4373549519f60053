"""Tiled MLP (parallel.tiled_mlp, trainer/parallel/tiled_mlp.py): the same outputs and gradients as
the untiled MLP, against a plain PyTorch reference in fp64, through checkpointing, LoRA and autocast."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from trainer.lora import add_adapters
from trainer.models import build
from trainer.models.config import ModelArgs
from trainer.models.llama import MLP
from trainer.ops.dispatch import KernelChoice
from trainer.parallel import apply_activation_checkpointing, apply_tiled_mlp
from trainer.parallel.tiled_mlp import tiled_forward


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # fresh random inputs, the same on every run


def _args(hidden=24, intermediate=40, fused=False, activation="silu", **extra) -> ModelArgs:
    return ModelArgs(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=intermediate,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        fused_projections=fused,
        mlp_activation=activation,
        **extra,
    )


def _reference(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    """The MLP written out with plain torch ops (no trainer.ops)."""
    if mlp.fused:
        gate, up = (x @ mlp.gate_up_proj.weight.T).chunk(2, dim=-1)
    else:
        gate, up = x @ mlp.gate_proj.weight.T, x @ mlp.up_proj.weight.T
    act = F.gelu(gate, approximate="tanh") if mlp.activation == "gelu_tanh" else F.silu(gate)
    return (act * up) @ mlp.down_proj.weight.T


def _tiled(mlp: MLP, tiles: int):
    return lambda x: tiled_forward(mlp, mlp.forward, tiles, x)


def _grads(fn, module, x, grad_out):
    x = x.detach().requires_grad_(True)
    for p in module.parameters():
        p.grad = None
    out = fn(x)
    out.backward(grad_out)
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tiles", [1, 2, 3, 5, 8])
@pytest.mark.parametrize(
    "shape, fused, activation",
    [((2, 32), False, "silu"), ((3, 37), False, "silu"), ((1, 29), True, "silu"), ((2, 21), False, "gelu_tanh")],
    ids=["round", "odd", "phi3-fused-odd", "geglu-odd"],
)
def test_tiled_mlp_equals_the_fp64_reference(shape, fused, activation, tiles):
    torch.manual_seed(tiles)
    mlp = MLP(_args(fused=fused, activation=activation), KernelChoice()).double()
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(*shape, 24, dtype=torch.float64)
    grad_out = torch.randn(*shape, 24, dtype=torch.float64)
    want = _grads(lambda t: _reference(mlp, t), mlp, x, grad_out)
    got = _grads(_tiled(mlp, tiles), mlp, x, grad_out)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-12)
    assert got[2].keys() == want[2].keys() and len(got[2]) == (2 if fused else 3)
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-12, atol=1e-12, msg=name)


def test_without_grad_the_tiles_still_give_the_output():
    """Evaluation and generation (no graph): any number of tokens, tiles that do not divide it."""
    mlp = MLP(_args(), KernelChoice()).double()
    x = torch.randn(1, 13, 24, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(_tiled(mlp, 4)(x), _reference(mlp, x), rtol=1e-12, atol=1e-12)


def test_each_weight_gradient_is_accumulated_once_per_backward():
    """The Function hands back the summed weight gradients: one AccumulateGrad per parameter, so
    DDP's ready-hooks and the layer-wise optimizers' post-accumulate hooks fire once, not once a tile."""
    mlp = MLP(_args(), KernelChoice())
    fired = {name: 0 for name, _ in mlp.named_parameters()}
    for name, p in mlp.named_parameters():
        p.register_post_accumulate_grad_hook(lambda _, name=name: fired.__setitem__(name, fired[name] + 1))
    x = torch.randn(2, 16, 24, requires_grad=True)
    _tiled(mlp, 4)(x).sum().backward()
    assert fired == dict.fromkeys(fired, 1)


def _model_pair(preset="tiny", dtype=torch.float32, tiles=4, mode="none", seed=0):
    plain = build(preset, vocab_size=320, seed=seed).to(dtype)
    tiled = copy.deepcopy(plain)
    assert apply_tiled_mlp(tiled, tiles) == plain.args.n_layers
    apply_activation_checkpointing(tiled, mode)
    return plain, tiled


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _assert_relative(got: dict, want: dict, rtol: float):
    """Each gradient's relative error ||got - want|| / ||want|| within rtol. Norm-wise: the weight
    gradients differ from the untiled ones by the summation order over tokens (per-tile sums), a
    few ulps on single elements; in fp32 over 30 seeded draws the worst was 2.4e-7 norm-wise
    (6.8e-7 for the largest element's difference over the largest element)."""
    assert got.keys() == want.keys()
    for name in want:
        err = (got[name] - want[name]).norm() / want[name].norm().clamp(min=1e-30)
        assert err <= rtol, f"{name}: {err:.2e} relative"


@pytest.mark.parametrize("mode", ["none", "full", "selective"])
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-6)], ids=["fp64", "fp32"])
def test_the_model_gives_the_untiled_loss_and_gradients(mode, dtype, rtol):
    plain, tiled = _model_pair(dtype=dtype, tiles=4, mode=mode)
    ids = torch.randint(0, 320, (3, 48))
    want_loss, want = _loss_and_grads(plain, ids)
    got_loss, got = _loss_and_grads(tiled, ids)
    assert abs(got_loss.item() / want_loss.item() - 1) <= rtol
    _assert_relative(got, want, rtol)


def test_selective_checkpointing_keeps_no_tile_matmul_output(monkeypatch):
    """Under selective checkpointing the matmuls inside the tiled forward (run without a graph) are
    not cached by the checkpoint: caching them would keep every tile's gate, up and down outputs."""
    from torch.utils.checkpoint import CheckpointPolicy

    from trainer.parallel import checkpointing

    decisions = []
    policy = checkpointing._save_matmuls_and_attention

    def recording(ctx, op, *args, **kwargs):
        decision = policy(ctx, op, *args, **kwargs)
        decisions.append((torch.is_grad_enabled(), getattr(op, "overloadpacket", None), decision))
        return decision

    monkeypatch.setattr(checkpointing, "_save_matmuls_and_attention", recording)
    _, tiled = _model_pair(tiles=2, mode="selective")
    ids = torch.randint(0, 320, (2, 32))
    tiled(ids, labels=ids).backward()
    mm = torch.ops.aten.mm
    no_grad_mm = [d for grad, op, d in decisions if not grad and op is mm]
    assert no_grad_mm and all(d is CheckpointPolicy.PREFER_RECOMPUTE for d in no_grad_mm)
    assert any(d is CheckpointPolicy.MUST_SAVE for grad, op, d in decisions if grad and op is mm)  # attention's q/k/v/o


def _lora_pair(dropout: float, dtype=torch.float64):
    plain = build("tiny", vocab_size=320, seed=0).to(dtype)
    targets = [n for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear) and ".mlp." in n]
    add_adapters(plain, targets, rank=4, alpha=8, dropout=dropout)
    for name, p in plain.named_parameters():
        if "lora_" in name:  # B starts at zero: give both factors values, so every gradient is non-trivial
            torch.nn.init.normal_(p, std=0.1)
            p.data = p.data.to(dtype)
    tiled = copy.deepcopy(plain)
    apply_tiled_mlp(tiled, 3)
    return plain, tiled


def test_lora_adapters_on_the_mlp_train_as_untiled():
    plain, tiled = _lora_pair(dropout=0.0)
    ids = torch.randint(0, 320, (2, 45))
    want_loss, want = _loss_and_grads(plain, ids)
    got_loss, got = _loss_and_grads(tiled, ids)
    assert any("lora_A" in n for n in want) and not any("base_layer" in n for n in want)
    assert abs(got_loss.item() / want_loss.item() - 1) <= 1e-12
    _assert_relative(got, want, 1e-12)


def test_lora_dropout_is_drawn_again_identically_in_backward():
    """With dropout the recompute must draw the forward's masks again. The reference runs the
    untiled model's MLPs on the same tiles in the same order (so the same random numbers)."""
    plain, tiled = _lora_pair(dropout=0.3)
    for block in plain.model.layers:  # the reference: the plain MLP, tile by tile, with autograd
        mlp = block.mlp
        mlp.forward = lambda x, f=mlp.forward: torch.cat(
            [f(t) for t in x.reshape(-1, x.shape[-1]).tensor_split(3)]
        ).view(*x.shape[:-1], -1)
    ids = torch.randint(0, 320, (2, 45))
    torch.manual_seed(7)
    want_loss, want = _loss_and_grads(plain, ids)
    after_reference = torch.rand(1)
    torch.manual_seed(7)
    got_loss, got = _loss_and_grads(tiled, ids)
    assert torch.rand(1) == after_reference  # the recompute left the caller's RNG stream where forward left it
    assert abs(got_loss.item() / want_loss.item() - 1) <= 1e-12
    _assert_relative(got, want, 1e-12)


def test_bf16_autocast_recomputes_in_bf16_and_matches_untiled():
    plain, tiled = _model_pair(tiles=4)
    dtypes = []
    for block in tiled.model.layers:
        block.mlp.down_proj.register_forward_hook(lambda m, i, out: dtypes.append((torch.is_grad_enabled(), out.dtype)))
    ids = torch.randint(0, 320, (2, 64))
    results = []
    for model in (plain, tiled):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    # forward tiles without a graph, then the recompute in backward with one: both in bf16
    assert {d for d in dtypes} == {(False, torch.bfloat16), (True, torch.bfloat16)}
    (want_loss, want), (got_loss, got) = results
    assert abs(got_loss.item() / want_loss.item() - 1) <= 1e-6  # the forward is the same bf16 arithmetic
    # The weight gradients sum per-tile bf16 products in fp32 instead of one bf16 matmul: close, not equal.
    _assert_relative(got, want, 2e-2)


def test_moe_layers_stay_untiled():
    args = _args(n_experts=4, experts_per_token=2, moe_intermediate_size=16, dense_layers=(0,))
    model = build(args, seed=0)
    before = [type(b.mlp).__name__ for b in model.model.layers]
    assert apply_tiled_mlp(model, 2) == 1
    assert before == ["MLP", "MoE"]
    assert "forward" in vars(model.model.layers[0].mlp) and "forward" not in vars(model.model.layers[1].mlp)


def test_zero_tiles_leaves_the_model_alone():
    model = build("tiny", vocab_size=320, seed=0)
    assert apply_tiled_mlp(model, 0) == 0
    assert all("forward" not in vars(b.mlp) for b in model.model.layers)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"parallel.tiled_mlp": 3},
            "parallel.tiled_mlp=3 does not divide train.seq_len=256 into equal tiles; use 2 or 4",
        ),
        ({"parallel.tiled_mlp": 7, "train.seq_len": 96}, "use 6 or 8 (the nearest divisors of 96)"),
        ({"parallel.tiled_mlp": 300}, "use 256 (the nearest divisors of 256)"),
        ({"parallel.tiled_mlp": -1}, "parallel.tiled_mlp must be >= 0"),
        ({"parallel.tiled_mlp": 2, "parallel.compile": True}, "parallel.tiled_mlp with parallel.compile=true"),
    ],
)
def test_config_refuses_what_cannot_tile(overrides, message):
    from trainer.config import load_config
    from trainer.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_tiled_matches_untiled_and_keeps_less():
    """On the GPU (Triton gated activation, bf16 autocast): the untiled loss, close gradients, and a
    smaller peak at 1 x 4096 tokens."""
    plain = build("small", vocab_size=320, seed=0).cuda()
    tiled = copy.deepcopy(plain)
    apply_tiled_mlp(tiled, 4)
    ids = torch.randint(0, 320, (1, 1024), device="cuda").repeat(1, 4)
    results, peaks = [], []
    for model in (plain, tiled):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids)
        loss.backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (want_loss, want), (got_loss, got) = results
    assert abs(got_loss.item() / want_loss.item() - 1) <= 1e-6
    _assert_relative(got, want, 2e-2)
    assert peaks[1] < peaks[0]
