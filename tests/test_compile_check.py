"""csrc_triton.compile_check: what it records from the launch helpers, a fast subset compiled for sm_90a
(Triton's own ptxas, no GPU), how it judges a configuration, and the one-line error a launch that
cannot compile raises. CI runs the full check (.ci/run)."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trainer.ops as ops
from trainer.models.config import PRESETS
from trainer.ops.dispatch import KernelError

triton = pytest.importorskip("triton", reason="the compile check needs triton (Linux)")
compile_check = pytest.importorskip("csrc_triton.compile_check")
from csrc_triton import _common  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def compiled_env() -> dict:
    # The check compiles; the interpreter that conftest turns on for CPU runs must be off.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return env


@pytest.mark.parametrize("preset", ["llama-1b", "llama-7b", "llama-8b"])
def test_model_shapes_are_the_presets(preset):
    p = PRESETS[preset]
    shape = compile_check.MODELS[preset]
    head_dim = p.get("head_dim") or p["hidden_size"] // p["n_heads"]
    assert (shape.hidden, shape.intermediate, shape.heads, shape.kv_heads, shape.head_dim, shape.vocab) == (
        p["hidden_size"],
        p["intermediate_size"],
        p["n_heads"],
        p["n_kv_heads"],
        head_dim,
        p["vocab_size"],
    )


def test_every_kernel_is_recorded_in_every_direction():
    kernels = {
        f"{m}.{name}"
        for m in ("cross_entropy", "rms_norm", "rope", "swiglu")
        for name, obj in vars(__import__(f"csrc_triton.{m}", fromlist=["_"])).items()
        if name.endswith("_kernel") and hasattr(obj, "arg_names")
    }
    launches = compile_check.launches()
    assert {f"{launch.module.split('.')[-1]}.{launch.function}" for launch in launches} == kernels
    labels = {launch.kernel for launch in launches}
    assert {
        "rms_norm.forward",
        "rms_norm.backward",
        "add_rms_norm.forward",
        "add_rms_norm.backward",
        "rope.forward",
        "rope.backward",
        "swiglu.forward",
        "swiglu.backward",
        "geglu.forward",
        "geglu.backward",
        "gemma_rms_norm.forward",
        "gemma_rms_norm.backward",
        "gemma_add_rms_norm.forward",
        "gemma_add_rms_norm.backward",
        "qk_norm.forward",
        "qk_norm.backward",
        "gemma_qk_norm.forward",
        "gemma_qk_norm.backward",
        "cross_entropy.loss_and_grad",
        "cross_entropy.loss",
        "cross_entropy.grad_scaled",
    } <= labels
    assert len(launches) == len(compile_check.MODELS) * len(compile_check.DTYPES) * len(labels)


def test_model_variants_reach_the_kernels_as_constants():
    # The new families' kernels: Gemma's RMSNorm (offset 1, fp32 until the output), the q-norm over
    # head_dim, and the gated kernel's tanh-GELU, each at the model's own width.
    launches = {x.kernel: x for x in compile_check.launches(["gemma2-9b"], ["bf16"])}
    from csrc_triton.swiglu import GELU_TANH, SILU

    def variant(label):
        return launches[label].constexprs["OFFSET"], launches[label].constexprs["ROUND_NORMED"]

    assert variant("rms_norm.forward") == variant("add_rms_norm.backward") == (0.0, True)
    for label in ("gemma_rms_norm.forward", "gemma_add_rms_norm.backward", "gemma_qk_norm.backward"):
        assert variant(label) == (1.0, False)
    assert launches["gemma_rms_norm.forward"].shape == "rows=8192 cols=3584 torch.bfloat16"
    assert launches["qk_norm.forward"].shape == f"rows={8192 * 16} cols=256 torch.bfloat16"
    assert launches["geglu.forward"].constexprs["ACTIVATION"] == GELU_TANH
    assert launches["swiglu.backward"].constexprs["ACTIVATION"] == SILU
    assert launches["geglu.backward"].shape == "rows=8192 cols=14336 torch.bfloat16"


def test_recorded_launch_carries_triton_specialisations():
    (launch,) = [
        x
        for x in compile_check.launches(["qwen2-7b"], ["fp16"], ["cross_entropy"])
        if x.kernel == "cross_entropy.loss_and_grad"
    ]
    assert launch.signature["LOGITS"] == "*fp16" and launch.signature["LABELS"] == "*i64"
    assert launch.signature["n_cols"] == "i32" and launch.signature["label_smoothing"] == "fp32"
    arg_names = getattr(importlib.import_module(launch.module), launch.function).arg_names
    assert arg_names.index("n_cols") in launch.divisible  # 152064 = 16 x 9504
    assert arg_names.index("ignore_index") not in launch.divisible  # -100
    assert launch.constexprs["BLOCK"] == 4096 and launch.constexprs["WRITE_GRAD"] is True


def test_fast_subset_compiles_without_spills(tmp_path):
    out = tmp_path / "check.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "csrc_triton.compile_check",
            "--models",
            "llama-8b",
            "--dtypes",
            "bf16",
            "--arch",
            "sm_90a",
            "--kernels",
            "rms_norm,rope,cross_entropy",
            "--jobs",
            "1",
            "--json",
            str(out),
        ],
        cwd=REPO,
        env=compiled_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    records = report["records"]
    # rms_norm in Llama's and Gemma's form (4), rope (2), cross_entropy (4)
    assert len(records) == report["summary"]["configurations"] == 10
    for r in records:
        assert r["ok"] and r["arch"] == "sm_90a" and r["dtype"] == "bf16" and r["model"] == "llama-8b"
        assert 0 < r["registers"] <= 255 and r["spill_bytes"] == 0 and r["shared_bytes"] >= 0
        assert r["num_warps"] in (4, 8, 16, 32) and r["num_stages"] >= 1
    norm = next(r for r in records if r["kernel"] == "rms_norm.backward")
    assert norm["blocks"] == {"BLOCK": 4096, "ONE_BLOCK": True}


def test_a_configuration_that_cannot_compile_is_one_failed_record(tmp_path):
    # A swiglu launch with a block that is not a power of two: tl.arange refuses it.
    code = (
        "import json; from csrc_triton import compile_check as cc\n"
        "launch = next(x for x in cc.launches(['llama-8b'], ['bf16'], ['swiglu']) if x.kernel == 'swiglu.forward')\n"
        "launch.constexprs['BLOCK'] = 1000\n"
        "records, _ = cc.run([launch], [90], 1)\n"
        "print(json.dumps(records))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=compiled_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    (record,) = json.loads(done.stdout.strip().splitlines()[-1])
    assert not record["ok"]
    error = record["error"]
    assert "\n" not in error
    assert error.startswith("_swiglu_fwd_kernel for llama-8b (rows=8192 cols=14336 torch.bfloat16) on sm_90a: ")


def test_limits_name_what_is_exceeded():
    fine = {"registers": 64, "spill_bytes": 0, "shared_bytes": 1024, "num_warps": 8}
    assert compile_check.check_limits(fine, 90) is None
    assert "spills 8 bytes" in compile_check.check_limits({**fine, "spill_bytes": 8}, 90)
    assert "256 registers a thread > 255" in compile_check.check_limits({**fine, "registers": 256}, 90)
    assert "128 registers x 1024 threads > 65536" in compile_check.check_limits(
        {**fine, "registers": 128, "num_warps": 32}, 90
    )
    # 200 KB of shared memory fits an H100 (227 KB a block) but not an RTX 4090 (99 KB).
    assert compile_check.check_limits({**fine, "shared_bytes": 200 * 1024}, 90) is None
    assert "shared memory > 101376" in compile_check.check_limits({**fine, "shared_bytes": 200 * 1024}, 89)


def test_arch_and_filters_are_validated():
    with pytest.raises(SystemExit, match="architecture 'ampere'"):
        compile_check.main(["--arch", "ampere"])
    with pytest.raises(SystemExit, match="unknown model llama-3b"):
        compile_check.main(["--models", "llama-3b"])
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):  # as conftest sets it on CPU
        with pytest.raises(SystemExit, match="TRITON_INTERPRET is set"):
            compile_check.main(["--models", "llama-8b"])
    assert compile_check.parse_arch("sm_90a") == 90 and compile_check.arch_label(90) == "sm_90a"
    assert compile_check.parse_arch("sm_80") == 80 and compile_check.arch_label(80) == "sm_80"


class _Refusing:
    """Stands in for a JIT kernel whose compile runs out of shared memory."""

    __name__ = "_fake_kernel"

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            from triton.runtime.errors import OutOfResources

            raise OutOfResources(300000, 232448, "shared memory")

        return run


def test_a_launch_that_cannot_compile_raises_one_line_naming_kernel_shape_arch():
    x = torch.zeros(3, 5)
    with pytest.raises(_common.KernelCompileError) as info:
        _common.launch(_Refusing(), (3,), (x,), {"BLOCK": 8}, "rows=3 cols=5 fp32")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        "Triton kernel _fake_kernel cannot be compiled for rows=3 cols=5 fp32 on cpu "
        "(interpreter): OutOfResources: out of resource: shared memory, Required: 300000"
    )
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no Triton traceback attached


def test_the_ops_turn_it_into_a_trainer_error(monkeypatch):
    # The command line prints a TrainerError's one line without a traceback.
    from csrc_triton import swiglu

    def refuse(*args, **kwargs):
        raise _common.KernelCompileError("Triton kernel _swiglu_fwd_kernel cannot be compiled for ...")

    monkeypatch.setattr(swiglu, "swiglu_forward", refuse)
    with pytest.raises(KernelError, match="_swiglu_fwd_kernel cannot be compiled") as info:
        ops.swiglu(torch.randn(2, 4), torch.randn(2, 4), force="triton")
    assert info.value.__suppress_context__
