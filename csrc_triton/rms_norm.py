"""RMSNorm and residual-add + RMSNorm kernels.

Forward: one program per row; the row's sum of squares and the normalisation happen in fp32
whatever the storage dtype. Rows up to MAX_ONE_BLOCK elements stay in registers between the two;
wider rows are streamed twice.

Two model-family differences are parameters of the same kernels: `offset` is added to the weight
(Gemma stores w and multiplies by 1 + w), and ROUND_NORMED says where the result meets the input's
dtype. True: the normalised value is rounded to it before the weight multiplies (Llama's order);
False: the weight multiplies in fp32 and only the output is rounded (Gemma 2/3, OLMo 2).

Backward: a fixed number of programs each walks a contiguous range of rows and keeps its own fp32
partial sum of dW, written once per program into a (programs, cols) buffer that torch reduces.
That keeps dW free of atomics (one contended row of atomics serialises every program) and makes
it deterministic. Rows wider than MAX_ONE_BLOCK are streamed, with the dW partial row kept in that
global buffer.
"""

import torch
import triton
import triton.language as tl

from csrc_triton._common import launch, num_warps_for, persistent_programs

# Widest row kept whole in registers (8192 fp32 over 16 warps is 16 registers a thread per tensor);
# wider rows are processed in LOOP_BLOCK slices. Kept whole, a 16384 row spilled (ptxas, sm_80 and
# sm_90a): the backward 96-136 bytes a thread over 32 warps, the forward 4-8 bytes with triton 3.3-3.5.
MAX_ONE_BLOCK = 8192
LOOP_BLOCK = 4096


@triton.jit
def _rms_norm_fwd_kernel(
    X,
    R,
    W,
    Y,
    S,
    RSTD,
    stride_x,
    stride_r,
    stride_y,
    stride_s,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    OFFSET: tl.constexpr,
    ROUND_NORMED: tl.constexpr,
    BLOCK: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    r_row = R + row * stride_r
    s_row = S + row * stride_s
    y_row = Y + row * stride_y
    # With ROUND_NORMED the normalised value is rounded to the input's dtype before the weight
    # multiplies it, the order Hugging Face Llama uses; with a residual the input is the stored sum.
    norm_ty = S.dtype.element_ty if HAS_RESIDUAL else X.dtype.element_ty
    cols = tl.arange(0, BLOCK)
    if ONE_BLOCK:
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            x += tl.load(r_row + cols, mask=mask, other=0.0).to(tl.float32)
            # Normalise the sum as stored, so the result equals add-then-norm done separately.
            x_stored = x.to(S.dtype.element_ty)
            tl.store(s_row + cols, x_stored, mask=mask)
            x = x_stored.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if OFFSET != 0.0:
            w += OFFSET
        normed = x * rstd
        if ROUND_NORMED:
            normed = normed.to(norm_ty).to(tl.float32)
        tl.store(y_row + cols, (normed * w).to(Y.dtype.element_ty), mask=mask)
    else:
        sum_sq = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            c = start + cols
            mask = c < n_cols
            x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                x += tl.load(r_row + c, mask=mask, other=0.0).to(tl.float32)
                x_stored = x.to(S.dtype.element_ty)
                tl.store(s_row + c, x_stored, mask=mask)
                x = x_stored.to(tl.float32)
            sum_sq += x * x
        rstd = tl.rsqrt(tl.sum(sum_sq, axis=0) / n_cols + eps)
        for start in range(0, n_cols, BLOCK):
            c = start + cols
            mask = c < n_cols
            # The sum is recomputed rather than read back from S: reading another thread's store
            # without a barrier would be a race.
            x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                x += tl.load(r_row + c, mask=mask, other=0.0).to(tl.float32)
                x = x.to(S.dtype.element_ty).to(tl.float32)
            w = tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
            if OFFSET != 0.0:
                w += OFFSET
            normed = x * rstd
            if ROUND_NORMED:
                normed = normed.to(norm_ty).to(tl.float32)
            tl.store(y_row + c, (normed * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    DY,
    X,
    W,
    RSTD,
    DS,
    DX,
    DW_PARTIAL,
    stride_dy,
    stride_x,
    stride_ds,
    stride_dx,
    n_rows,
    n_cols,
    rows_per_program,
    HAS_DS: tl.constexpr,
    OFFSET: tl.constexpr,
    ROUND_NORMED: tl.constexpr,
    BLOCK: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
):
    # y = (w + offset) * n with n = x * rstd:  dx = rstd * (g - n * mean(g * n)) with
    # g = dy * (w + offset),  dw = sum dy * n (the offset is a constant: d(w + offset)/dw = 1).
    pid = tl.program_id(0)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    dw_row = DW_PARTIAL + pid.to(tl.int64) * n_cols
    norm_ty = X.dtype.element_ty
    cols = tl.arange(0, BLOCK)
    if ONE_BLOCK:
        mask = cols < n_cols
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if OFFSET != 0.0:
            w += OFFSET
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        for row in range(row_start, row_end):
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            n = x * rstd
            g = dy * w
            dx = (g - n * (tl.sum(g * n, axis=0) / n_cols)) * rstd
            if HAS_DS:
                dx += tl.load(DS + row * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            # The forward multiplied w by n, rounded to the input dtype with ROUND_NORMED; its
            # gradient sees the same.
            if ROUND_NORMED:
                dw += dy * n.to(norm_ty).to(tl.float32)
            else:
                dw += dy * n
        tl.store(dw_row + cols, dw, mask=mask)
    else:
        # Rows too wide for registers: the program's dW partial row lives in the (zeroed) global
        # buffer, which only this program touches.
        for row in range(row_start, row_end):
            rstd = tl.load(RSTD + row)
            gn = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK):
                c = start + cols
                mask = c < n_cols
                dy = tl.load(DY + row * stride_dy + c, mask=mask, other=0.0).to(tl.float32)
                x = tl.load(X + row * stride_x + c, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
                # dy * (w + OFFSET) as dy * w + dy * OFFSET: written the first way, the fp32 kernel
                # over 16384 columns spilled 8 bytes on sm_90a (ptxas kept it to 32 registers).
                g = dy * w
                if OFFSET != 0.0:
                    g += dy * OFFSET
                gn += g * (x * rstd)
            mean_gn = tl.sum(gn, axis=0) / n_cols
            for start in range(0, n_cols, BLOCK):
                c = start + cols
                mask = c < n_cols
                dy = tl.load(DY + row * stride_dy + c, mask=mask, other=0.0).to(tl.float32)
                x = tl.load(X + row * stride_x + c, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
                g = dy * w
                if OFFSET != 0.0:
                    g += dy * OFFSET
                n = x * rstd
                dx = (g - n * mean_gn) * rstd
                if HAS_DS:
                    dx += tl.load(DS + row * stride_ds + c, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + row * stride_dx + c, dx.to(DX.dtype.element_ty), mask=mask)
                acc = tl.load(dw_row + c, mask=mask, other=0.0)
                if ROUND_NORMED:
                    acc += dy * n.to(norm_ty).to(tl.float32)
                else:
                    acc += dy * n
                tl.store(dw_row + c, acc, mask=mask)
            # The next row reads these partial sums back; make every thread's stores visible.
            tl.debug_barrier()


def forward_config(n_cols: int, max_block: int = MAX_ONE_BLOCK) -> dict:
    """BLOCK, ONE_BLOCK and num_warps of the forward kernel (csrc_triton.compile_check compiles the same)."""
    block = triton.next_power_of_2(n_cols)
    if block > max_block:
        block = min(LOOP_BLOCK, max_block)
        return dict(BLOCK=block, ONE_BLOCK=False, num_warps=num_warps_for(block))
    return dict(BLOCK=block, ONE_BLOCK=True, num_warps=num_warps_for(block))


def backward_config(n_cols: int, max_block: int = MAX_ONE_BLOCK) -> dict:
    """BLOCK, ONE_BLOCK and num_warps of the backward kernel."""
    config = forward_config(n_cols, max_block)
    if not config["ONE_BLOCK"] and config["BLOCK"] == LOOP_BLOCK:
        # The streamed loop, 4 elements of a 4096-column slice a thread: over 8 or 16 warps ptxas
        # spilled 4 bytes in one configuration or another (triton 3.3 or 3.4; fp16/fp32; sm_80/sm_90a),
        # over 32 warps none with triton 3.2 to 3.9. Two programs an SM then fill it.
        config["num_warps"] = 32
    return config


def _variant(offset: float, round_normed: bool) -> dict:
    # The offset is a compile-time constant (the models use 0 or 1) that the kernels add only when
    # non-zero, so Llama's compiled kernels stay as they were: added at run time, even 0, it made the
    # streamed fp32 backward over 16384 columns spill 8 bytes on sm_90a.
    return dict(OFFSET=float(offset), ROUND_NORMED=bool(round_normed))


def _check_rows(name: str, t: torch.Tensor, n_cols: int) -> None:
    if t.dim() != 2 or t.shape[1] != n_cols or (n_cols > 1 and t.stride(1) != 1):
        raise ValueError(
            f"{name} must be (rows, {n_cols}) with unit stride along the row, "
            f"got shape {tuple(t.shape)} strides {t.stride()}"
        )


def rms_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    *,
    offset: float = 0.0,
    round_normed: bool = True,
    max_block: int = MAX_ONE_BLOCK,
):
    """RMSNorm over the rows of x (rows, cols), optionally of x + residual first:
    y = n * (weight + offset) with n = x / rms(x), n rounded to the input's dtype first when
    round_normed (Llama), else kept in fp32 (Gemma).

    Returns (y, s, rstd): y in promote(input, weight) dtype when round_normed, else in the input's
    (Gemma's output.type_as(x)); s the stored sum x + residual (None without a residual); rstd
    (rows,) fp32, the reciprocal RMS that the backward reuses.
    """
    n_rows, n_cols = x.shape
    _check_rows("x", x, n_cols)
    weight = weight.contiguous()
    if residual is not None:
        _check_rows("residual", residual, n_cols)
        sum_dtype = torch.promote_types(x.dtype, residual.dtype)
        s = torch.empty((n_rows, n_cols), dtype=sum_dtype, device=x.device)
    else:
        sum_dtype, s = x.dtype, None
    y_dtype = torch.promote_types(sum_dtype, weight.dtype) if round_normed else sum_dtype
    y = torch.empty((n_rows, n_cols), dtype=y_dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return y, s, rstd
    has_res = residual is not None
    args = (
        x,
        residual if has_res else x,
        weight,
        y,
        s if has_res else y,
        rstd,
        x.stride(0),
        residual.stride(0) if has_res else 0,
        y.stride(0),
        s.stride(0) if has_res else 0,
        n_cols,
        eps,
    )
    launch(
        _rms_norm_fwd_kernel,
        (n_rows,),
        args,
        dict(HAS_RESIDUAL=has_res, **_variant(offset, round_normed), **forward_config(n_cols, max_block)),
        f"rows={n_rows} cols={n_cols} {x.dtype}",
    )
    return y, s, rstd


def rms_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    dsum: torch.Tensor | None = None,
    *,
    offset: float = 0.0,
    round_normed: bool = True,
    max_block: int = MAX_ONE_BLOCK,
):
    """Gradients of rms_norm_forward (same offset and round_normed). x is what was normalised (the
    stored sum with a residual).

    dsum, the gradient reaching the stored sum directly, is added to dx. Returns (dx in x's dtype,
    dw in fp32).
    """
    n_rows, n_cols = x.shape
    _check_rows("x", x, n_cols)
    _check_rows("dy", dy, n_cols)
    if dsum is not None:
        _check_rows("dsum", dsum, n_cols)
    weight = weight.contiguous()
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    if n_rows == 0:
        return dx, torch.zeros(n_cols, dtype=torch.float32, device=x.device)
    config = backward_config(n_cols, max_block)
    programs = persistent_programs(x.device, n_rows)
    rows_per_program = triton.cdiv(n_rows, programs)
    programs = triton.cdiv(n_rows, rows_per_program)
    # The one-block kernel writes every partial row; the streamed one accumulates into it.
    alloc = torch.empty if config["ONE_BLOCK"] else torch.zeros
    dw_partial = alloc((programs, n_cols), dtype=torch.float32, device=x.device)
    args = (
        dy,
        x,
        weight,
        rstd,
        dsum if dsum is not None else dy,
        dx,
        dw_partial,
        dy.stride(0),
        x.stride(0),
        dsum.stride(0) if dsum is not None else 0,
        dx.stride(0),
        n_rows,
        n_cols,
        rows_per_program,
    )
    launch(
        _rms_norm_bwd_kernel,
        (programs,),
        args,
        dict(HAS_DS=dsum is not None, **_variant(offset, round_normed), **config),
        f"rows={n_rows} cols={n_cols} {x.dtype}",
    )
    return dx, dw_partial.sum(0)
