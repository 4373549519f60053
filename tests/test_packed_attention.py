"""Packed documents: the attention mask that keeps each document to itself. On CPU the model uses the
dense boolean SDPA mask; on CUDA a flex-attention block mask built once per forward by a compiled
create_block_mask, which the selective checkpointing policy saves rather than recomputes. Sequence
length 300 throughout: not a multiple of flex attention's 128-wide blocks."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.utils.checkpoint import CheckpointPolicy

from trainer.models import ModelArgs, build, llama
from trainer.ops.testing import compiled_gpu_skip_reason, rel_err
from trainer.parallel import apply_activation_checkpointing
from trainer.parallel.checkpointing import _save_matmuls_and_attention

GPU_SKIP_REASON = compiled_gpu_skip_reason()
SEQ = 300


def needs_gpu(test):
    return pytest.mark.gpu(pytest.mark.skipif(GPU_SKIP_REASON is not None, reason=GPU_SKIP_REASON or "")(test))


def packed_document_ids(device="cpu"):
    # Row 0: three documents, boundaries off the 128 grid; row 1: one long document and a short tail.
    return torch.tensor([[0] * 100 + [1] * 120 + [2] * 80, [0] * 290 + [1] * 10], device=device)


def dense_oracle(document_ids, window=None):
    """(batch, 1, seq, seq): query i sees key j when j <= i, both lie in the same document, and
    (with a sliding window) i - j < window, as transformers' sliding_window_overlay has it."""
    batch, seq = document_ids.shape
    mask = torch.zeros(batch, 1, seq, seq, dtype=torch.bool)
    for b in range(batch):
        for i in range(seq):
            for j in range(i + 1):
                in_window = window is None or i - j < window
                mask[b, 0, i, j] = bool(document_ids[b, i] == document_ids[b, j]) and in_window
    return mask


@pytest.mark.parametrize("window", [None, 5])
def test_cpu_uses_the_dense_boolean_mask(window):
    doc = packed_document_ids()
    mask = llama.attention_mask(doc, window, SEQ, "cpu")
    assert isinstance(mask, torch.Tensor) and mask.dtype == torch.bool
    assert torch.equal(mask, dense_oracle(doc, window))


def test_a_window_without_documents_is_one_mask_for_the_batch_and_none_when_it_covers_the_sequence():
    one_document = torch.zeros(1, SEQ, dtype=torch.long)
    assert torch.equal(llama.attention_mask(None, 5, SEQ, "cpu"), dense_oracle(one_document, 5))
    assert llama.attention_mask(None, SEQ, SEQ, "cpu") is None and llama.attention_mask(None, None, SEQ, "cpu") is None


@pytest.mark.parametrize("window", [None, 5])
def test_mask_function_equals_the_dense_mask(window):
    # The CUDA path's mask function, run through flex attention's unfused (eager, forward-only) CPU path.
    doc = packed_document_ids()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, SEQ, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    block_mask = create_block_mask(llama.mask_mod(doc, window), 2, None, SEQ, SEQ, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "called without torch.compile": unfused, which is the point here
        out = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_oracle(doc, window), enable_gqa=True)
    assert rel_err(out, ref) <= 1e-12


def test_selective_policy_saves_flex_attention():
    hops = torch._higher_order_ops
    assert _save_matmuls_and_attention(None, hops.flex_attention) == CheckpointPolicy.MUST_SAVE
    assert _save_matmuls_and_attention(None, hops.inductor_compiled_code) == CheckpointPolicy.MUST_SAVE
    assert _save_matmuls_and_attention(None, torch.ops.aten.mm.default) == CheckpointPolicy.MUST_SAVE
    assert _save_matmuls_and_attention(None, torch.ops.aten.add.Tensor) == CheckpointPolicy.PREFER_RECOMPUTE


# ---- CUDA: the block mask ----


def small_args():
    return ModelArgs(
        vocab_size=512, hidden_size=128, intermediate_size=256, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=512
    )


@needs_gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_block_mask_attention_equals_dense_mask(dtype, tol):
    torch.manual_seed(0)
    args = small_args()
    attn = llama.Attention(args, llama.KernelChoice()).cuda().to(dtype)
    doc = packed_document_ids("cuda")
    x = torch.randn(2, SEQ, args.hidden_size, device="cuda", dtype=dtype, requires_grad=True)
    cos, sin = llama.RotaryEmbedding(args).cuda()(SEQ, None, "cuda")
    block_mask = llama.attention_mask(doc, None, SEQ, "cuda")
    assert isinstance(block_mask, BlockMask)
    params = [x, *attn.parameters()]
    out = attn(x, cos, sin, block_mask)
    grads = torch.autograd.grad(out.float().square().sum(), params)
    ref = attn(x, cos, sin, dense_oracle(doc.cpu()).cuda())
    ref_grads = torch.autograd.grad(ref.float().square().sum(), params)
    assert rel_err(out, ref) <= tol
    for got, want in zip(grads, ref_grads, strict=True):
        assert rel_err(got, want) <= tol


@needs_gpu
def test_one_block_mask_per_forward_shared_by_every_layer(monkeypatch):
    calls = []
    compiled = llama.compiled_create_block_mask()

    def counting(*args, **kwargs):
        calls.append(args[1:])
        return compiled(*args, **kwargs)

    monkeypatch.setattr(llama, "compiled_create_block_mask", lambda: counting)
    model = build(small_args(), seed=0).cuda()
    ids = torch.randint(0, 512, (2, SEQ), device="cuda")
    model(ids, document_ids=packed_document_ids("cuda"))
    assert calls == [(2, None, SEQ, SEQ)]


@needs_gpu
def test_selective_checkpointing_with_block_mask_matches_no_checkpointing():
    doc = packed_document_ids("cuda")
    ids = torch.randint(0, 512, (2, SEQ), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    results = []
    for mode in ("none", "selective"):
        model = build(small_args(), seed=0).cuda()
        apply_activation_checkpointing(model, mode)
        loss = model(ids, labels=ids, document_ids=doc)
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    (loss, grads), (ref_loss, ref_grads) = results[1], results[0]
    assert rel_err(loss, ref_loss) <= 1e-6
    for got, want in zip(grads, ref_grads, strict=True):
        assert rel_err(got, want) <= 1e-5
