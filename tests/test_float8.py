"""train.float8 (trainer/parallel/float8.py): torchao's Float8Linear on the decoder's linear layers.

float8 GEMMs need a GPU of compute capability 8.9+; on CPU, torchao's emulation (float8 casts,
matmuls in high precision) checks the conversion and its numerics, and the setting is refused
for a real run in one line. The GPU run is a `gpu` test.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.helpers import tiny_config
from tests.test_cli import run_cli, tiny_args
from trainer.models import build
from trainer.models.config import ModelArgs

torchao = pytest.importorskip("torchao")

# every linear width a multiple of 16 (float8 GEMMs need them): q, k, v, o, gate, up and down convert
ARGS = ModelArgs(vocab_size=256, hidden_size=64, intermediate_size=176, n_layers=2, n_heads=4, n_kv_heads=2)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_emulated_float8_converts_the_decoder_linears_and_stays_near_the_reference(recipe):
    from trainer.parallel.float8 import apply_float8

    reference = build(ARGS, seed=0)
    model = copy.deepcopy(reference)
    converted = apply_float8(model, recipe, fsdp=False, emulate=True)
    float8 = {name for name, m in model.named_modules() if type(m).__name__ == "Float8Linear"}
    assert float8 == set(converted) and len(converted) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert type(model.lm_head).__name__ == "Linear"  # the fused loss reads the head's weight itself
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    loss, ref_loss = model(x, labels=x), reference(x, labels=x)
    loss.backward()
    ref_loss.backward()
    # float8's rounding shows, and stays small: e4m3 has a 3-bit mantissa
    assert 0 < abs(loss.item() - ref_loss.item()) / ref_loss.item() < 1e-3
    for name, p in reference.named_parameters():
        got = dict(model.named_parameters())[name].grad
        assert rel(got, p.grad) < 0.2, name
    down = "model.layers.0.mlp.down_proj.weight"
    assert rel(dict(model.named_parameters())[down].grad, dict(reference.named_parameters())[down].grad) > 1e-3


def test_linears_with_widths_float8_cannot_take_stay_as_they_are():
    from trainer.parallel.float8 import apply_float8

    args = ModelArgs(vocab_size=256, hidden_size=40, intermediate_size=88, n_layers=1, n_heads=4, n_kv_heads=2)
    model = build(args, seed=0)
    assert apply_float8(model, "tensorwise", fsdp=False, emulate=True) == []


def test_float8_on_a_cpu_run_is_refused_in_one_line(tmp_path):
    proc = run_cli("train", *tiny_args(tmp_path, train__float8="tensorwise"), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.float8=tensorwise needs a CUDA GPU of compute capability 8.9" in lines[0]
    assert not (tmp_path / "cache").exists()  # refused before the corpus was read


def test_float8_with_lora_is_refused():
    from trainer.errors import ConfigError
    from trainer.parallel.float8 import check_float8

    with pytest.raises(ConfigError, match="train.float8=rowwise with lora.rank=8 is not supported"):
        check_float8("rowwise", torch.device("cpu"), lora_rank=8)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs an sm_89+ GPU"
)
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_run_on_a_gpu_learns_like_bf16(tmp_path, recipe):
    from trainer import Trainer
    from trainer.metrics import read_metrics

    losses = {}
    for name, float8 in (("bf16", "none"), (recipe, recipe)):
        cfg = tiny_config(
            tmp_path,
            train__output_dir=str(tmp_path / name),
            train__device="cuda",
            train__dtype="bf16",
            train__float8=float8,
            model__hidden_size=256,
            model__intermediate_size=704,
            train__max_steps=30,
        )
        Trainer(cfg).train()
        losses[name] = [r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r]
    assert losses[recipe][-1] < losses[recipe][0]
    assert abs(losses[recipe][-1] - losses["bf16"][-1]) / losses["bf16"][-1] < 0.05
