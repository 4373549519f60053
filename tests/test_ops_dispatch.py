"""The op layer: dispatch and `force=`, working without triton, custom-op registration
(torch.compile with fullgraph=True), and GPU-only checks (dispatch to Triton, no host syncs)."""

import collections
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import trainer.ops as ops
from trainer.ops.dispatch import HAS_TRITON
from trainer.ops.testing import compiled_gpu_skip_reason, rel_err

REPO = Path(__file__).resolve().parents[1]
GPU_SKIP_REASON = compiled_gpu_skip_reason()
ON_GPU = GPU_SKIP_REASON is None


def needs_gpu(test):
    return pytest.mark.gpu(pytest.mark.skipif(GPU_SKIP_REASON is not None, reason=GPU_SKIP_REASON or "")(test))


def small_block_inputs(device="cpu", dtype=torch.float32, seed=0):
    """Inputs of a miniature Llama block: batch 2, seq 5, hidden 16, 4 q heads / 2 kv heads of 4."""
    g = torch.Generator().manual_seed(seed)
    batch, seq, hidden, vocab = 2, 5, 16, 40
    t = {
        "x": torch.randn(batch, seq, hidden, generator=g),
        "residual": torch.randn(batch, seq, hidden, generator=g),
        "norm_w": 1 + 0.1 * torch.randn(hidden, generator=g),
        "wq": torch.randn(hidden, hidden, generator=g) / 4,
        "wk": torch.randn(hidden // 2, hidden, generator=g) / 4,
        "w_gate_up": torch.randn(2 * 24, hidden, generator=g) / 4,
        "w_down": torch.randn(hidden, 24, generator=g) / 5,
        "lm_head": torch.randn(vocab, hidden, generator=g) / 4,
    }
    angles = torch.arange(seq)[:, None] * (1.0 / 10000 ** (torch.arange(0, 4, 2) / 4))
    emb = torch.cat((angles, angles), -1)
    t = {k: v.to(device, dtype).requires_grad_() for k, v in t.items()}
    t["cos"], t["sin"] = emb.cos().to(device, dtype), emb.sin().to(device, dtype)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[0, 0] = -100
    t["labels"] = labels.to(device)
    return t


def block(x, residual, norm_w, wq, wk, w_gate_up, w_down, lm_head, cos, sin, labels, force="auto"):
    """All four ops in the order a Llama block and its head use them."""
    batch, seq, hidden = x.shape
    total, h = ops.add_rms_norm(x, residual, norm_w, force=force)
    q = (h @ wq.t()).view(batch, seq, 4, 4).transpose(1, 2)
    k = (h @ wk.t()).view(batch, seq, 2, 4).transpose(1, 2)
    q, k = ops.rope(q, k, cos, sin, force=force)
    # A stand-in for attention: enough to route gradients through both rotated tensors.
    attn = q.transpose(1, 2).reshape(batch, seq, hidden)
    attn = attn + k.transpose(1, 2).reshape(batch, seq, hidden // 2).repeat(1, 1, 2)
    total = total + attn
    gate, up = (ops.rms_norm(total, norm_w, force=force) @ w_gate_up.t()).chunk(2, dim=-1)
    out = total + ops.swiglu(gate, up, force=force) @ w_down.t()
    return ops.linear_cross_entropy(ops.rms_norm(out, norm_w, force=force), lm_head, labels, force=force)


PARAMS = ("x", "residual", "norm_w", "wq", "wk", "w_gate_up", "w_down", "lm_head")


def run_block(fn, t, **kw):
    loss = fn(*(t[k] for k in PARAMS), t["cos"], t["sin"], t["labels"], **kw)
    return loss, torch.autograd.grad(loss, [t[k] for k in PARAMS])


def test_force_is_validated():
    x = torch.randn(2, 4)
    with pytest.raises(ValueError):
        ops.rms_norm(x, torch.ones(4), force="cuda")


LAUNCH_HELPERS = {
    "rms_norm": ("rms_norm_forward", "rms_norm_backward"),
    "rope": ("rope_rotate",),
    "swiglu": ("swiglu_forward", "swiglu_backward"),
    "cross_entropy": ("cross_entropy_rows_",),
}


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls of every Triton launch helper (the ops import them at call time)."""
    import importlib

    calls = collections.Counter()
    if not HAS_TRITON:
        return calls  # nothing could launch a kernel anyway
    for module_name, names in LAUNCH_HELPERS.items():
        module = importlib.import_module(f"csrc_triton.{module_name}")
        for name in names:
            monkeypatch.setattr(module, name, _counting(getattr(module, name), name, calls))
    return calls


def _counting(fn, name, calls):
    def spy(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)

    return spy


def test_cpu_dispatches_to_the_reference(kernel_calls):
    t = small_block_inputs()
    loss, grads = run_block(block, t)
    ref_loss, ref_grads = run_block(block, t, force="reference")
    assert not kernel_calls
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads, strict=True))


def test_triton_and_reference_paths_agree_on_a_block(kernel_calls):
    pytest.importorskip("triton")
    device = "cuda" if ON_GPU else "cpu"
    t = small_block_inputs(device)
    loss, grads = run_block(block, t, force="triton")
    assert set(kernel_calls) == {name for names in LAUNCH_HELPERS.values() for name in names}
    ref_loss, ref_grads = run_block(block, t, force="reference")
    assert rel_err(loss, ref_loss) <= 1e-5
    for a, b in zip(grads, ref_grads, strict=True):
        assert rel_err(a, b) <= 1e-5


def test_compile_fullgraph_over_all_four_ops():
    # The ops are custom ops with fake implementations, so the whole block is one graph: any
    # graph break would make fullgraph=True raise.
    torch._dynamo.reset()
    t = small_block_inputs(seed=1)
    compiled = torch.compile(block, fullgraph=True, dynamic=False)
    loss, grads = run_block(compiled, t)
    ref_loss, ref_grads = run_block(block, t)
    assert rel_err(loss, ref_loss) <= 1e-5
    for a, b in zip(grads, ref_grads, strict=True):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("triton_path", [False, True])
def test_custom_op_registrations(triton_path):
    # opcheck: schema, fake (meta) implementations agreeing with the real ones, autograd
    # registration, and AOT dispatch.
    if triton_path:
        pytest.importorskip("triton")
    device = "cuda" if ON_GPU and triton_path else "cpu"
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, grad=True):
        return torch.randn(*shape, generator=g).to(device).requires_grad_(grad)

    labels = torch.tensor([1, -100, 4, 0, 2], device=device)
    cases = [
        (torch.ops.trainer.rms_norm, (rnd(3, 8), rnd(8), None, 1e-6, 0.0, "llama", triton_path)),
        (torch.ops.trainer.rms_norm, (rnd(3, 8), rnd(8), rnd(3, 8), 1e-6, 0.0, "llama", triton_path)),
        (torch.ops.trainer.rms_norm, (rnd(3, 8), rnd(8), rnd(3, 8), 1e-6, 1.0, "gemma", triton_path)),
        (
            torch.ops.trainer.rope,
            (rnd(1, 2, 3, 4), rnd(1, 1, 3, 4), rnd(3, 4, grad=False), rnd(3, 4, grad=False), False, triton_path),
        ),
        (torch.ops.trainer.gated_activation, (rnd(3, 5), rnd(3, 5), "silu", triton_path)),
        (torch.ops.trainer.gated_activation, (rnd(3, 5), rnd(3, 5), "gelu_tanh", triton_path)),
        (
            torch.ops.trainer.linear_cross_entropy,
            (rnd(5, 8), rnd(11, 8), rnd(11), labels, -100, "sum", 0.1, 1e-3, 4.0, True, True, True, triton_path),
        ),
        (
            torch.ops.trainer.linear_cross_entropy,
            (rnd(5, 8), rnd(11, 8), None, labels, -100, "none", 0.0, 0.0, None, True, True, False, triton_path),
        ),
        (  # chunks capped at 264 bytes (chunk_bytes): 3 tokens of the reference's and of the Triton path's
            torch.ops.trainer.linear_cross_entropy,
            (rnd(5, 8), rnd(11, 8), None, labels, -100, "none", 0.0, 0.0, None, True, True, False, triton_path, 264),
        ),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_import_and_reference_without_triton():
    # On a machine without triton (macOS, Windows, some CI), importing the ops and running their
    # reference paths must work; asking for the kernels must say why not.
    code = textwrap.dedent("""
        import sys

        class RefuseTriton:
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ModuleNotFoundError("No module named 'triton' (refused by the test)")
                return None

        sys.meta_path.insert(0, RefuseTriton())
        import torch
        import trainer.ops as ops
        from trainer.ops.dispatch import HAS_TRITON

        assert not HAS_TRITON
        x = torch.randn(2, 3, 8, requires_grad=True)
        w = torch.ones(8, requires_grad=True)
        total, y = ops.add_rms_norm(x, x, w)
        q, k = ops.rope(torch.randn(1, 2, 3, 4), torch.randn(1, 1, 3, 4), torch.ones(3, 4), torch.zeros(3, 4))
        s = ops.swiglu(x, x)
        loss = ops.linear_cross_entropy(y + s, torch.randn(10, 8), torch.randint(0, 10, (2, 3)))
        (loss + ops.rms_norm(total, w).sum() + q.sum()).backward()
        assert x.grad is not None and w.grad is not None
        assert "triton" not in sys.modules and "csrc_triton.rms_norm" not in sys.modules
        try:
            ops.swiglu(x, x, force="triton")
        except RuntimeError as e:
            assert "triton is not installed" in str(e)
        else:
            raise AssertionError("force='triton' without triton should fail")
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


@needs_gpu
def test_cuda_dispatches_to_triton(kernel_calls):
    t = small_block_inputs("cuda")
    run_block(block, t)
    assert set(kernel_calls) == {name for names in LAUNCH_HELPERS.values() for name in names}


@needs_gpu
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_loss_has_no_host_sync(reduction):
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    weight = torch.randn(1000, 128, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    labels = torch.randint(0, 1000, (64,), device="cuda", generator=g)
    normalizer = (labels != -100).sum()
    ops.linear_cross_entropy(hidden, weight, labels)  # warm-up: compile the kernel outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = ops.linear_cross_entropy(hidden, weight, labels, reduction=reduction, normalizer=normalizer)
        torch.autograd.grad(loss.sum(), (hidden, weight))
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_gpu
def test_gpu_compile_fullgraph_with_triton_kernels():
    torch._dynamo.reset()
    t = small_block_inputs("cuda", seed=2)
    compiled = torch.compile(block, fullgraph=True)
    loss, grads = run_block(compiled, t)
    ref_loss, ref_grads = run_block(block, t, force="reference")
    assert rel_err(loss, ref_loss) <= 1e-5
    for a, b in zip(grads, ref_grads, strict=True):
        assert rel_err(a, b) <= 1e-5
