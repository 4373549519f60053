"""Rotary position embedding of q and k in one launch, rotate-half convention.

One program per (batch, position): it loads that position's cos/sin once and rotates every q head
and then every k head (their counts may differ, as with grouped-query attention). q and k are read
and written through their strides, so the usual (batch, seq, heads, dim) -> (batch, heads, seq,
dim) transpose needs no copy; only head_dim must be contiguous.
"""

import torch
import triton
import triton.language as tl

from csrc_triton._common import launch

# Elements of one (heads x half head_dim) tile: the tile is held twice (both halves) in fp32.
MAX_TILE = 2048


@triton.jit
def _rotate_heads(
    X, OUT, x_base, o_base, n_heads, stride_xh, stride_oh, half, d, d_mask, c1, c2, s1, s2, BLOCK_H: tl.constexpr
):
    for h0 in range(0, n_heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mask = (h < n_heads)[:, None] & d_mask[None, :]
        x_ptr = X + x_base + h[:, None] * stride_xh + d[None, :]
        o_ptr = OUT + o_base + h[:, None] * stride_oh + d[None, :]
        x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + half, mask=mask, other=0.0).to(tl.float32)
        o1 = x1 * c1[None, :] - x2 * s1[None, :]
        o2 = x2 * c2[None, :] + x1 * s2[None, :]
        tl.store(o_ptr, o1.to(OUT.dtype.element_ty), mask=mask)
        tl.store(o_ptr + half, o2.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q,
    K,
    QO,
    KO,
    COS,
    SIN,
    seq_len,
    n_q_heads,
    n_k_heads,
    half,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_qob,
    stride_qoh,
    stride_qos,
    stride_kob,
    stride_koh,
    stride_kos,
    stride_cb,
    stride_cs,
    stride_sb,
    stride_ss,
    INVERSE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # out = x * cos + rotate_half(x) * sin, per half:  o1 = x1 c1 - x2 s1,  o2 = x2 c2 + x1 s2.
    # The backward applies the transpose of that 2x2 rotation (the inverse when c1 = c2 and
    # s1 = s2, as in every Llama table), which is the same form with s1 -> -s2, s2 -> -s1.
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq_len
    s = pid % seq_len
    d = tl.arange(0, BLOCK_D)
    d_mask = d < half
    cos_row = COS + b * stride_cb + s * stride_cs
    sin_row = SIN + b * stride_sb + s * stride_ss
    c1 = tl.load(cos_row + d, mask=d_mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_row + half + d, mask=d_mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_row + d, mask=d_mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_row + half + d, mask=d_mask, other=0.0).to(tl.float32)
    if INVERSE:
        s_first = s1
        s1 = -s2
        s2 = -s_first
    _rotate_heads(
        Q,
        QO,
        b * stride_qb + s * stride_qs,
        b * stride_qob + s * stride_qos,
        n_q_heads,
        stride_qh,
        stride_qoh,
        half,
        d,
        d_mask,
        c1,
        c2,
        s1,
        s2,
        BLOCK_H,
    )
    _rotate_heads(
        K,
        KO,
        b * stride_kb + s * stride_ks,
        b * stride_kob + s * stride_kos,
        n_k_heads,
        stride_kh,
        stride_koh,
        half,
        d,
        d_mask,
        c1,
        c2,
        s1,
        s2,
        BLOCK_H,
    )


def launch_config(n_q_heads: int, n_k_heads: int, head_dim: int) -> dict:
    """BLOCK_H, BLOCK_D and num_warps (csrc_triton.compile_check compiles the same choice)."""
    block_d = triton.next_power_of_2(head_dim // 2)
    block_h = max(1, min(triton.next_power_of_2(max(n_q_heads, n_k_heads, 1)), MAX_TILE // block_d))
    return dict(BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4 if block_h * block_d <= 1024 else 8)


def _table(t: torch.Tensor, batch: int, seq: int, dim: int) -> torch.Tensor:
    if t.dim() == 2:
        t = t[None]
    if t.dim() != 3 or t.shape[1:] != (seq, dim) or t.shape[0] not in (1, batch):
        raise ValueError(
            f"cos/sin must be (seq, head_dim) or (batch, seq, head_dim) = (.., {seq}, {dim}), got {tuple(t.shape)}"
        )
    t = t.expand(batch, seq, dim)  # a shared table gets batch stride 0, no copy
    return t if t.stride(2) == 1 else t.contiguous()


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def rope_rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False):
    """Returns new (q, k) rotated by the (cos, sin) table, or by its transpose when inverse.

    q is (batch, q_heads, seq, head_dim), k (batch, k_heads, seq, head_dim), any strides with a
    contiguous head_dim; the outputs keep the inputs' memory layout. Math in fp32.
    """
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be (batch, heads, seq, head_dim), got {tuple(q.shape)} and {tuple(k.shape)}")
    batch, n_q, seq, dim = q.shape
    if k.shape[0] != batch or k.shape[2:] != (seq, dim):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, seq or head_dim")
    if dim % 2:
        raise ValueError(f"head_dim must be even for rotate-half RoPE, got {dim}")
    q, k = _unit_last(q), _unit_last(k)
    cos, sin = _table(cos, batch, seq, dim), _table(sin, batch, seq, dim)
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    if batch * seq == 0:
        return q_out, k_out
    args = (
        q,
        k,
        q_out,
        k_out,
        cos,
        sin,
        seq,
        n_q,
        k.shape[1],
        dim // 2,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        q_out.stride(0),
        q_out.stride(1),
        q_out.stride(2),
        k_out.stride(0),
        k_out.stride(1),
        k_out.stride(2),
        cos.stride(0),
        cos.stride(1),
        sin.stride(0),
        sin.stride(1),
    )
    launch(
        _rope_kernel,
        (batch * seq,),
        args,
        dict(INVERSE=inverse, **launch_config(n_q, k.shape[1], dim)),
        f"q={tuple(q.shape)} k={tuple(k.shape)} {q.dtype}",
    )
    return q_out, k_out
