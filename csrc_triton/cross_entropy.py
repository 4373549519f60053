"""Cross-entropy over rows of logits: loss and d loss / d logits in one kernel, in place.

Used chunk by chunk by the fused linear cross-entropy: torch computes a chunk's logits with one
matmul (cuBLAS, in the input dtype), this kernel turns that buffer into its gradient in place, and
torch runs the two gradient matmuls from it. The (tokens x vocab) logits never exist at once.

One program per row, two passes over the vocabulary: an online max / sum-of-exponentials for the
log-sum-exp (so huge logits cannot overflow), then the gradient. Math in fp32 whatever the storage.
"""

import torch
import triton
import triton.language as tl

from csrc_triton._common import launch, num_warps_for

# Vocabulary slice per loop step: 4096 fp32 over 8 warps is 16 registers a thread per tensor.
MAX_BLOCK = 4096


@triton.jit
def _tanh(x):
    # tl.math has no tanh that also runs in the interpreter. For |x| >= 1/16 the exp form is
    # accurate (and exact at +-inf); below, a Taylor series avoids its cancellation near zero.
    a = tl.abs(x)
    t = tl.exp(-2.0 * a)
    big = (1.0 - t) / (1.0 + t)
    a2 = a * a
    small = a * (1.0 - a2 * (0.3333333333333333 - a2 * (0.13333333333333333 - a2 * 0.05396825396825397)))
    r = tl.where(a < 0.0625, small, big)
    return tl.where(x < 0, -r, r)


@triton.jit
def _logits(row_ptr, BIAS, cols, mask, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        z = softcap * _tanh(z / softcap)
    return z


@triton.jit
def _cross_entropy_kernel(
    LOGITS,
    stride_row,
    LABELS,
    BIAS,
    LOSS,
    ROW_SCALE,
    n_cols,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr,
    WRITE_LOSS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = LOGITS + row * stride_row
    label = tl.load(LABELS + row).to(tl.int64)
    valid = label != ignore_index
    # A label outside the vocabulary (and not ignore_index) must not read past the row: it reads column
    # 0 like an ignored row, and its loss and gradient become NaN so that the step shows it.
    bad = valid & ((label < 0) | (label >= n_cols))
    target = tl.where(valid & ~bad, label, 0)
    cols0 = tl.arange(0, BLOCK)

    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], dtype=tl.float32)
    z_sum = tl.zeros([], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + cols0
        mask = cols < n_cols
        z = _logits(row_ptr, BIAS, cols, mask, softcap, HAS_BIAS, HAS_SOFTCAP)
        z = tl.where(mask, z, float("-inf"))
        # Every slice holds at least one real column, so m_new is finite and exp(m - m_new)
        # is 0 on the first step rather than NaN.
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
        if HAS_SMOOTHING:
            z_sum += tl.sum(tl.where(mask, z, 0.0), axis=0)
    lse = m + tl.log(s)

    if WRITE_LOSS:
        z_target = _logits(row_ptr, BIAS, target, valid & ~bad, softcap, HAS_BIAS, HAS_SOFTCAP)
        loss = lse - z_target
        if HAS_SMOOTHING:
            # (1 - eps) * CE(one-hot) + eps * CE(uniform)
            loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - z_sum / n_cols)
        if HAS_Z_LOSS:
            loss += z_loss * lse * lse
        tl.store(LOSS + row, tl.where(bad, float("nan"), tl.where(valid, loss, 0.0)))

    if WRITE_GRAD:
        scale = 1.0
        if HAS_ROW_SCALE:
            scale = tl.load(ROW_SCALE + row).to(tl.float32)
        scale = tl.where(bad, float("nan"), tl.where(valid, scale, 0.0))
        # z-loss adds 2 * z_loss * lse * softmax to the gradient.
        p_scale = 1.0
        if HAS_Z_LOSS:
            p_scale = 1.0 + 2.0 * z_loss * lse
        for start in range(0, n_cols, BLOCK):
            cols = start + cols0
            mask = cols < n_cols
            z = _logits(row_ptr, BIAS, cols, mask, softcap, HAS_BIAS, HAS_SOFTCAP)
            d = tl.exp(z - lse) * p_scale
            if HAS_SMOOTHING:
                d -= label_smoothing / n_cols
            d = tl.where(cols == target, d - (1.0 - label_smoothing), d)
            if HAS_SOFTCAP:
                # d softcap * tanh(z / softcap) / dz = 1 - tanh^2
                d *= 1.0 - (z / softcap) * (z / softcap)
            tl.store(row_ptr + cols, (d * scale).to(LOGITS.dtype.element_ty), mask=mask)


def launch_config(n_cols: int) -> dict:
    """BLOCK and num_warps for rows of n_cols logits (csrc_triton.compile_check compiles the same choice)."""
    block = min(MAX_BLOCK, triton.next_power_of_2(n_cols))
    return dict(BLOCK=block, num_warps=num_warps_for(block))


def cross_entropy_rows_(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    loss_out: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    compute_grad: bool = True,
    block: int | None = None,
):
    """Per-row cross-entropy of logits (rows, vocab) (+ bias) against labels (rows,).

    Writes the fp32 per-row loss (0 where the label is ignore_index, NaN where it is outside
    [0, vocab)) into loss_out when given, and, when compute_grad, overwrites logits with d loss /
    d logits (times row_scale[row] if given; 0 on ignored rows, NaN on out-of-vocabulary ones). The
    loss is (1 - label_smoothing) * CE + label_smoothing * CE against the uniform distribution,
    + z_loss * lse^2, with logits soft-capped to softcap * tanh(logits / softcap) first. Returns logits.
    """
    if logits.dim() != 2 or (logits.shape[1] > 1 and logits.stride(1) != 1):
        raise ValueError(
            f"logits must be (rows, vocab) with unit stride along vocab, got {tuple(logits.shape)} "
            f"strides {logits.stride()}"
        )
    n_rows, n_cols = logits.shape
    if labels.shape != (n_rows,):
        raise ValueError(f"labels must be ({n_rows},), got {tuple(labels.shape)}")
    if loss_out is not None and (
        loss_out.shape != (n_rows,) or loss_out.dtype != torch.float32 or (n_rows > 1 and loss_out.stride(0) != 1)
    ):
        raise ValueError("loss_out must be a contiguous fp32 (rows,) tensor")
    if row_scale is not None:
        row_scale = row_scale.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    labels = labels.contiguous()
    if n_rows == 0 or (loss_out is None and not compute_grad):
        return logits
    config = launch_config(n_cols) if block is None else dict(BLOCK=block, num_warps=num_warps_for(block))
    args = (
        logits,
        logits.stride(0),
        labels,
        bias if bias is not None else logits,
        loss_out if loss_out is not None else logits,
        row_scale if row_scale is not None else logits,
        n_cols,
        ignore_index,
        float(label_smoothing),
        float(z_loss),
        1.0 if softcap is None else float(softcap),
    )
    meta = dict(
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=softcap is not None,
        HAS_SMOOTHING=label_smoothing != 0.0,
        HAS_Z_LOSS=z_loss != 0.0,
        HAS_ROW_SCALE=row_scale is not None,
        WRITE_LOSS=loss_out is not None,
        WRITE_GRAD=compute_grad,
        **config,
    )
    launch(_cross_entropy_kernel, (n_rows,), args, meta, f"rows={n_rows} vocab={n_cols} {logits.dtype}")
    return logits
