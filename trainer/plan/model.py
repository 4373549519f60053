"""The Llama block, the embedding and the loss as Ops: what each allocates, keeps and frees.

Sizes follow trainer/models/llama.py and the ops in trainer/ops (N = micro_batch x seq_len tokens):
- dtypes: the residual stream (embedding output, the sums x + attn, h + mlp, the norms' outputs) is
  in the weights' dtype; under autocast (train.dtype bf16/fp16) every linear casts its input and
  weight to the compute dtype (a new copy per call for activations; weights are cast once per
  forward, autocast caches leaf tensors) and outputs in it; statistics (rstd, attention's
  log-sum-exp, the loss) are fp32.
- what backward keeps: RMSNorm its input and rstd; a linear its (cast) input; RoPE nothing (the
  tables are global); attention q, k, v, its output and log-sum-exp; SwiGLU its gate and up.
- temporaries: the Triton kernels (CUDA) write their outputs only. The PyTorch references (CPU,
  or a kernel switched off) compute in fp32 through intermediate tensors; their counts below are
  read off the reference code in trainer/ops and checked against the CPU allocator
  (docs/memory.md). CPU attention (`_scaled_dot_product_flash_attention_for_cpu`) keeps
  per-thread blocks of scores; CUDA flash attention's backward keeps an fp32 dq accumulator and,
  with grouped-query attention, dk and dv expanded to every query head (flash-attention 2,
  `mha_bwd`).
"""

from __future__ import annotations

from dataclasses import replace

from trainer.ops.cross_entropy import chunk_buffers, chunk_peak_bytes, chunk_tokens, materializes_logits
from trainer.ops.vocab_parallel_cross_entropy import chunk_size as vocab_parallel_chunk
from trainer.plan.graph import ACTIVATIONS, WEIGHT_COPIES, GradSink, Graph, Op
from trainer.plan.setting import Setting
from trainer.plan.shapes import lm_head_name
from trainer.plan.tape import Tape

F32 = 4


def _rms_extra(s: Setting, n_elems: int, rows: int, in_bytes: int, triton: bool, backward: bool) -> int:
    """Temporaries of trainer.ops.rms_norm's reference beyond its outputs (0 for the Triton kernel)."""
    if triton:
        return 0
    if in_bytes == F32:
        # no dtype conversions: forward one fp32 intermediate of the input's size; backward the
        # normalised values, the weighted gradient and one product at a time beside them (the
        # weight's gradient's product is made with dx already out), and the per-row means
        return (3 * n_elems + rows) * F32 if backward else n_elems * F32
    if backward:
        # fp32 copies of the input, of the normalised values and of the gradient, and the products,
        # plus under the "llama" cast the normalised values rounded to the input's dtype (what the
        # forward multiplied the weight by). Measured on CPU, beyond dx: 3 fp32 copies in fp32,
        # 5.5 (llama) or 4.5 (gemma) in bf16; the planner had 2 and 5 until the fused loss's chunk
        # cap made the final norm's backward a step's peak (tests/test_plan.py).
        return (11 if s.args.norm_cast == "llama" else 9) * n_elems * F32 // 2
    if s.args.norm_cast == "gemma":  # the input, the normalised values and their product with the weight, in fp32
        return 3 * n_elems * F32
    # the input and the normalised values in fp32, then rounded to the input's dtype
    return 2 * n_elems * F32 + n_elems * in_bytes


def rms_op(
    s: Setting,
    name: str,
    x: str,
    y: str,
    rstd: str,
    weight: str,
    residual: str | None = None,
    total: str | None = None,
    x_bytes: int | None = None,
    width: int | None = None,
    elems: int | None = None,
) -> Op:
    """RMSNorm of x over its last `width` (default hidden) of `elems` values (default the residual
    stream's: residual_elems), x_bytes per value (default the weights'); add_rms_norm: of residual + x, which it
    also returns as `total`. The output dtype follows trainer.ops.rms_norm: promoted with the
    weight's for the "llama" cast, the input's for "gemma"."""
    r = s.param_bytes
    xb = r if x_bytes is None else x_bytes
    n = residual_elems(s) if elems is None else elems
    rows = n // (width or s.args.hidden_size)
    sum_bytes = xb if residual is None else max(xb, r)  # the residual stream is in the weights' dtype
    y_bytes = max(sum_bytes, r) if s.args.norm_cast == "llama" else sum_bytes
    outputs = {y: n * y_bytes, rstd: rows * F32}
    saved_input = x
    grads = {x: n * xb}
    shared = {}
    if residual is not None:
        outputs = {total: n * sum_bytes, **outputs}
        saved_input = total
        # The gradient of the sum reaches both addends: the same tensor when their dtypes match.
        grads = {residual: n * r}
        if xb == r:
            shared = {x: residual}
        else:
            grads[x] = n * xb
    triton = s.runs_triton(s.kernels.rms_norm)
    return Op(
        name,
        inputs=(x,) if residual is None else (x, residual),
        outputs=outputs,
        saves=(saved_input, rstd),
        grads=grads,
        shared_grads=shared,
        weights=(weight,),
        nondiff=(rstd,),
        fwd_extra=_rms_extra(s, n, rows, sum_bytes, triton, False),
        bwd_extra=_rms_extra(s, n, rows, sum_bytes, triton, True),
    )


def _cast(s: Setting, name: str, x: str, to: str, elems: int, from_bytes: int, to_bytes: int) -> Op:
    return Op(name, inputs=(x,), outputs={to: elems * to_bytes}, grads={x: elems * from_bytes})


def linear_ops(
    s: Setting,
    name: str,
    x: str,
    in_features: int,
    x_bytes: int,
    out: str,
    out_features: int,
    weight: str,
    bias: str | None = None,
) -> list[Op]:
    """nn.Linear on x (x_bytes per element), with autocast's cast of x when it is not in the compute
    dtype; a layer with LoRA adapters (trainer/lora.py) is its frozen base plus the adapters' path."""
    module = weight.removesuffix(".weight")
    if module in s.lora_modules:
        return lora_linear_ops(s, name, x, in_features, x_bytes, out, out_features, module)
    c, n = s.compute_bytes, s.tokens
    ops = []
    src, src_bytes = x, x_bytes
    if s.autocast and x_bytes != c:
        src, src_bytes = f"{x}@{name}", c
        ops.append(_cast(s, f"{name} input cast", x, src, n * in_features, x_bytes, c))
    copies = {weight: in_features * out_features * c} if s.autocast and s.param_bytes != c else {}
    weights = (weight,) if bias is None else (weight, bias)
    out_bytes = c if s.autocast else s.param_bytes
    # A matmul keeps its input for its weight's gradient (and its weight for its input's).
    ops.append(
        Op(
            name,
            inputs=(src,),
            outputs={out: n * out_features * out_bytes},
            saves_for_weights=(src,),
            grads={src: n * in_features * src_bytes},
            weights=weights,
            weight_copies=copies,
            must_save=True,
        )
    )
    return ops


def lora_linear_ops(
    s: Setting, name: str, x: str, in_features: int, x_bytes: int, out: str, out_features: int, module: str
) -> list[Op]:
    """LoraLinear.forward: base_layer(x) + (lora_B(lora_A(dropout(x.to(fp32)))) * scaling).to(base's dtype).

    The frozen base keeps no input (its weight gets no gradient); lora_A keeps its (cast) input and
    lora_B the rank-r activation. Under autocast the adapters run in the compute dtype too. An nf4
    base is dequantized to the compute dtype in forward and again in backward (bitsandbytes)."""
    c, n, r = s.compute_bytes, s.tokens, s.lora.rank
    ops = []
    base_in, base_in_bytes = x, x_bytes
    if s.autocast and x_bytes != c:
        base_in, base_in_bytes = f"{x}@{name}", c
        ops.append(_cast(s, f"{name} input cast", x, base_in, n * in_features, x_bytes, c))
    base_w = f"{module}.base_layer.weight"
    nf4 = s.lora.quantize == "nf4"
    copies = {base_w: in_features * out_features * c} if s.autocast and s.param_bytes != c and not nf4 else {}
    dense = in_features * out_features * c if nf4 else 0
    out_bytes = c if s.autocast else s.param_bytes
    base_out = f"{out}@base"
    ops.append(
        Op(
            name,
            inputs=(base_in,),
            outputs={base_out: n * out_features * out_bytes},
            saves_for_weights=(base_in,),
            grads={base_in: n * in_features * base_in_bytes},
            weights=(base_w,),
            weight_copies=copies,
            must_save=True,
            fwd_extra=dense,
            bwd_extra=dense,
        )
    )
    src, src_bytes = x, x_bytes
    if x_bytes != F32:  # x.to(lora_A's dtype, fp32)
        src, src_bytes = f"{x}@{name}.lora32", F32
        ops.append(_cast(s, f"{name} lora fp32 cast", x, src, n * in_features, x_bytes, F32))
    act = c if s.autocast else F32  # the adapters' compute dtype
    if s.autocast and src_bytes != c:
        cast = f"{x}@{name}.lora_c"
        ops.append(_cast(s, f"{name} lora input cast", src, cast, n * in_features, src_bytes, c))
        src, src_bytes = cast, c
    if s.lora.dropout > 0:
        # The output and the mask backward keeps: boolean from CUDA's fused native_dropout, on CPU
        # a scaled noise tensor in the input's dtype (input * noise)
        dropped = f"{x}@{name}.dropout"
        mask = f"{dropped}.mask"
        mask_bytes = 1 if s.device == "cuda" else src_bytes
        ops.append(
            Op(
                f"{name} lora dropout",
                inputs=(src,),
                outputs={dropped: n * in_features * src_bytes, mask: n * in_features * mask_bytes},
                saves=(mask,),
                nondiff=(mask,),
                grads={src: n * in_features * src_bytes},
            )
        )
        src = dropped
    a, b = f"{out}@lora_A", f"{out}@lora_B"

    def adapter_copies(weight: str, elems: int) -> dict[str, int]:
        return {weight: elems * c} if s.autocast else {}

    ops.append(
        Op(
            f"{name}.lora_A",
            inputs=(src,),
            outputs={a: n * r * act},
            saves_for_weights=(src,),
            grads={src: n * in_features * src_bytes},
            weights=(f"{module}.lora_A.weight",),
            weight_copies=adapter_copies(f"{module}.lora_A.weight", r * in_features),
            must_save=True,
        )
    )
    ops.append(
        Op(
            f"{name}.lora_B",
            inputs=(a,),
            outputs={b: n * out_features * act},
            saves_for_weights=(a,),
            grads={a: n * r * act},
            weights=(f"{module}.lora_B.weight",),
            weight_copies=adapter_copies(f"{module}.lora_B.weight", out_features * r),
            must_save=True,
        )
    )
    scaled = f"{out}@lora_scaled"
    ops.append(
        Op(
            f"{name} lora scaling",
            inputs=(b,),
            outputs={scaled: n * out_features * act},
            grads={b: n * out_features * act},
        )
    )
    if act != out_bytes:
        ops.append(_cast(s, f"{name} lora output cast", scaled, f"{scaled}@out", n * out_features, act, out_bytes))
        scaled = f"{scaled}@out"
    ops.append(
        Op(
            f"{name} lora add",
            inputs=(base_out, scaled),
            outputs={out: n * out_features * out_bytes},
            alias_grads=(base_out, scaled),
        )
    )
    return ops


def _cpu_attention_blocks(s: Setting) -> tuple[int, int]:
    # Block sizes of ATen's CPU flash attention (aten/src/ATen/native/cpu/FlashAttentionKernel.cpp).
    t = s.seq_len
    q = 256 if t >= 768 else 64 if t >= 192 else 32
    return min(q, t), min(512, t)


def _linear_out_bytes(s: Setting) -> int:
    return s.compute_bytes if s.autocast else s.param_bytes


def _masked(s: Setting, layer: int) -> bool:
    """Whether layer `layer`'s attention takes an explicit mask (trainer.models.llama.attention_mask):
    packed documents, or a sliding window shorter than the sequence."""
    window = s.args.window_of(layer)
    return s.document_mask or (window is not None and window < s.seq_len)


def _mask_elems(s: Setting) -> int:
    """Values of a CPU attention mask: (batch, 1, seq, seq) with packed documents, else (1, 1, seq, seq)."""
    return (s.micro_batch if s.document_mask else 1) * s.seq_len * s.seq_len


def attention_op(s: Setting, layer: int, q: str, k: str, v: str) -> Op:
    """SDPA (CPU flash attention, CUDA flash attention; flex attention on CUDA with a window or
    softcap keeps the same tensors) on q, k, v in the compute dtype; output "attn"."""
    a, c = s.args, s.compute_bytes
    n, d = s.tokens, a.head_dim
    q_bytes, kv_bytes = n * a.n_heads * d * c, n * a.n_kv_heads * d * c
    lse = s.micro_batch * a.n_heads * s.seq_len * F32
    if s.device == "cpu":
        qs, ks = _cpu_attention_blocks(s)
        fwd = s.threads * (qs * ks + 2 * qs + qs * d) * F32 + (s.threads * qs * ks * c if c != F32 else 0)
        bwd = s.threads * 2 * qs * ks * F32
    else:
        fwd = 0
        bwd = n * a.n_heads * d * F32 + lse  # fp32 dq accumulator and softmax_d
        if a.n_kv_heads != a.n_heads:
            bwd += 2 * q_bytes  # dk, dv expanded to every query head
    outputs, saves, nondiff = {"attn": q_bytes, "lse": lse}, (q, k, v, "attn", "lse"), ("lse",)
    if _masked(s, layer) and s.device == "cpu":
        # SDPA turns the boolean mask into an additive one in q's dtype, per call, and keeps it
        outputs["float_mask"] = _mask_elems(s) * c
        saves, nondiff = (*saves, "float_mask"), (*nondiff, "float_mask")
    return Op(
        "attention",
        inputs=(q, k, v),
        outputs=outputs,
        saves=saves,
        grads={q: q_bytes, k: kv_bytes, v: kv_bytes},
        nondiff=nondiff,
        fwd_extra=fwd,
        bwd_extra=bwd,
        must_save=True,
    )


def softcapped_attention_ops(s: Setting, q: str, k: str, v: str) -> list[Op]:
    """trainer.models.llama.softcapped_attention (attention-logit softcapping off CUDA), op by op as
    autograd records it: k and v repeated to every query head, the scores' matmul, their scaling,
    cap and mask (each a tensor as large as the scores, made from the one before), the fp32 softmax
    (and its cast to the compute dtype), the values' matmul, and the reshaped copy o_proj reads
    (output "attn"). Selective checkpointing keeps the two matmuls' outputs (must_save) and
    recomputes the rest."""
    a, c = s.args, s.compute_bytes
    n, d = s.tokens, a.head_dim
    q_bytes, kv_bytes = n * a.n_heads * d * c, n * a.n_kv_heads * d * c
    score_elems = s.micro_batch * a.n_heads * s.seq_len * s.seq_len
    scores, probs_bytes = score_elems * c, score_elems * F32  # the softmax is taken in fp32
    mask = _mask_elems(s)
    probs = "probs"
    ops = [
        # ~mask, saved by masked_fill; without packed documents the causal mask is made here too
        Op("attention mask", outputs={"not_mask": mask}, nondiff=("not_mask",), fwd_extra=mask),
        Op(
            "repeat k, v",
            inputs=(k, v),
            outputs={"k_rep": q_bytes, "v_rep": q_bytes},
            grads={k: kv_bytes, v: kv_bytes},
        ),
        Op(
            "attention scores",
            inputs=(q, "k_rep"),
            outputs={"scores": scores},
            saves=(q, "k_rep"),
            grads={q: q_bytes, "k_rep": q_bytes},
            must_save=True,
        ),
        Op("scores * scale", inputs=("scores",), outputs={"scaled": scores}, grads={"scores": scores}),
        Op("scores / cap", inputs=("scaled",), outputs={"divided": scores}, grads={"scaled": scores}),
        Op("scores tanh", inputs=("divided",), outputs={"tanh": scores}, saves=("tanh",), grads={"divided": scores}),
        Op("cap * tanh", inputs=("tanh",), outputs={"capped": scores}, grads={"tanh": scores}),
        Op(
            "masked scores",
            inputs=("capped", "not_mask"),
            outputs={"masked": scores},
            saves=("not_mask",),
            grads={"capped": scores},
        ),
        Op(
            "attention softmax",
            inputs=("masked",),
            outputs={probs: probs_bytes},
            saves=(probs,),
            grads={"masked": probs_bytes},
        ),
    ]
    if c != F32:
        ops.append(_cast(s, "probs cast", probs, "probs_c", score_elems, F32, c))
        probs = "probs_c"
    ops.append(
        Op(
            "attention values",
            inputs=(probs, "v_rep"),
            outputs={"values": q_bytes},
            saves=(probs, "v_rep"),
            grads={probs: scores, "v_rep": q_bytes},
            must_save=True,
        )
    )
    ops.append(Op("attention heads joined", inputs=("values",), outputs={"attn": q_bytes}, grads={"values": q_bytes}))
    return ops


def rope_op(s: Setting, q: str, k: str, x_bytes: int, rotary_dim: int, q_out: str, k_out: str) -> Op:
    """trainer.ops.rope on the first rotary_dim of each head of q and k (x_bytes per value)."""
    a = s.args
    q_elems, k_elems = s.tokens * a.n_heads * rotary_dim, s.tokens * a.n_kv_heads * rotary_dim
    qb, kb = q_elems * x_bytes, k_elems * x_bytes
    fwd = bwd = 0
    if not s.runs_triton(s.kernels.rope):
        # trainer.ops.rope's reference: q * cos, rotate_half(q) (a half-size negation and a cat),
        # its product with sin, then the sum; k the same while q's result is held.
        fwd = max(3 * qb, qb + 3 * kb) - (qb + kb)
        bwd = max(7 * qb // 2, qb + 7 * kb // 2) - (qb + kb)
    if rotary_dim != a.head_dim:  # slices of q and k: their gradients are full-size tensors
        grads = {q: qb * a.head_dim // rotary_dim, k: kb * a.head_dim // rotary_dim}
    else:
        grads = {q: qb, k: kb}
    return Op("rope", inputs=(q, k), outputs={q_out: qb, k_out: kb}, grads=grads, fwd_extra=fwd, bwd_extra=bwd)


def swiglu_op(s: Setting) -> Op:
    return _gated_op(s, s.tokens * s.args.intermediate_size)


def _gated_op(s: Setting, e: int) -> Op:
    """trainer.ops.gated_activation on gate and up of e values each (SwiGLU or GeGLU: the reference
    makes the same temporaries)."""
    gate, up = "gate", "up"
    c = s.compute_bytes
    fwd = bwd = 0
    if not s.runs_triton(s.kernels.swiglu):
        fwd = e * c  # act(gate), then the product
        # in fp32 (copies of gate, up and the gradient when they are not fp32): d_gate from ATen's
        # silu_backward / gelu_backward(do * up, gate), then act(gate) and do * act; the fp32 d_gate
        # is kept while the up gradient is made, and each result is cast to its input's dtype
        bwd = e * F32 if c == F32 else 6 * e * F32 - e * c
    return Op(
        "swiglu",
        inputs=(gate, up),
        outputs={"act": e * c},
        saves=(gate, up),
        grads={gate: e * c, up: e * c},
        fwd_extra=fwd,
        bwd_extra=bwd,
    )


def _split_op(name: str, whole: str, parts: tuple[str, ...], nbytes: int) -> Op:
    """Views of one fused projection's output (Phi-3's qkv_proj, gate_up_proj). A view is counted
    as free and its base as kept for backward: some view of it (v, or gate and up) is. Backward
    joins the parts' gradients into one new tensor."""
    return Op(f"{name} split", inputs=(whole,), outputs=dict.fromkeys(parts, 0), saves=(whole,), grads={whole: nbytes})


def attention_ops(s: Setting, layer: int, x: str, x_bytes: int) -> list[Op]:
    """Attention.forward on x (the normed residual stream): projections, q/k norms, RoPE, attention,
    o_proj; output "attn_out"."""
    a, c = s.args, s.compute_bytes
    h, hd, kd = a.hidden_size, a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    att = f"model.layers.{layer}.self_attn."
    ob = _linear_out_bytes(s)
    n = s.tokens
    if a.fused_projections:
        qkv = hd + 2 * kd
        bias = att + "qkv_proj.bias" if a.qkv_bias else None
        ops = linear_ops(s, "qkv_proj", x, h, x_bytes, "qkv", qkv, att + "qkv_proj.weight", bias)
        ops.append(_split_op("qkv", "qkv", ("q", "k", "v"), n * qkv * ob))
    else:
        bias = (lambda proj: att + proj + ".bias") if a.qkv_bias else (lambda proj: None)
        ops = linear_ops(s, "q_proj", x, h, x_bytes, "q", hd, att + "q_proj.weight", bias("q_proj"))
        ops += linear_ops(s, "k_proj", x, h, x_bytes, "k", kd, att + "k_proj.weight", bias("k_proj"))
        ops += linear_ops(s, "v_proj", x, h, x_bytes, "v", kd, att + "v_proj.weight", bias("v_proj"))
    q, k, qk_bytes = "q", "k", ob
    if a.qk_norm != "none":  # RMSNorm over each head (Qwen3) or the whole projection (OLMo 2)
        qw, kw = (a.head_dim, a.head_dim) if a.qk_norm == "head" else (hd, kd)
        ops.append(rms_op(s, "q_norm", "q", "qn", "q_rstd", att + "q_norm.weight", x_bytes=ob, width=qw, elems=n * hd))
        ops.append(rms_op(s, "k_norm", "k", "kn", "k_rstd", att + "k_norm.weight", x_bytes=ob, width=kw, elems=n * kd))
        q, k = "qn", "kn"
        qk_bytes = max(ob, s.param_bytes) if a.norm_cast == "llama" else ob
    rotary = a.rotary_dim or a.head_dim
    if rotary == a.head_dim:
        ops.append(rope_op(s, q, k, qk_bytes, rotary, "q2", "k2"))
    else:  # Phi-3: the first rotary_dim of each head turned, then joined to the rest again
        ops.append(rope_op(s, q, k, qk_bytes, rotary, "q_rot", "k_rot"))
        ops.append(
            Op(
                "rotary join",
                inputs=("q_rot", "k_rot", q, k),
                outputs={"q2": n * hd * qk_bytes, "k2": n * kd * qk_bytes},
                # the turned parts' gradients are views of the joined ones'; the rest's come back
                # through a slice: full-size tensors
                grads={"q_rot": 0, "k_rot": 0, q: n * hd * qk_bytes, k: n * kd * qk_bytes},
            )
        )
    q, k = "q2", "k2"
    if s.autocast and qk_bytes != c:  # normed q and k in fp32: attention casts them to the compute dtype
        ops.append(_cast(s, "q cast", q, "qc", n * hd, qk_bytes, c))
        ops.append(_cast(s, "k cast", k, "kc", n * kd, qk_bytes, c))
        q, k = "qc", "kc"
    if a.attn_softcap is not None and s.device != "cuda":
        ops += softcapped_attention_ops(s, q, k, "v")
    else:
        ops.append(attention_op(s, layer, q, k, "v"))
    ops += linear_ops(s, "o_proj", "attn", hd, c, "attn_out", h, att + "o_proj.weight")
    return ops


def mlp_ops(s: Setting, layer: int, x: str, x_bytes: int) -> list[Op]:
    """MLP.forward on x: gate and up projections, the gated activation, down_proj; output "mlp_out".
    With parallel.tiled_mlp, one op for the whole tiled MLP (tiled_mlp_op)."""
    if s.tiled_mlp:
        return [tiled_mlp_op(s, layer, x, x_bytes)]
    return _mlp_ops(s, layer, x, x_bytes)


def tiled_mlp_op(s: Setting, layer: int, x: str, x_bytes: int) -> Op:
    """trainer.parallel.tiled_mlp: the MLP as one autograd Function that keeps only x and outputs
    "mlp_out". Forward runs the tiles without a graph (under autocast each weight cast once, held
    by autocast's cache to the end of the forward); backward allocates x's gradient and the summed
    weight gradients, then runs each tile's forward and backward again: one tile's MLP at a time.
    The tile's own peaks are replayed from the untiled MLP's ops at the tile's token count
    (_tile_extra), so whatever the MLP is made of (LoRA, fused gate_up_proj, autocast) is counted
    as it is untiled."""
    ops = _mlp_ops(s, layer, x, x_bytes)
    weights = tuple(dict.fromkeys(w for op in ops for w in op.weights))
    copies = {p: n for op in ops for p, n in op.weight_copies.items()}
    fwd, bwd = _tile_extra(s, layer, x, x_bytes)
    n, h = s.tokens, s.args.hidden_size
    return Op(
        "tiled mlp",
        inputs=(x,),
        outputs={"mlp_out": n * h * _linear_out_bytes(s)},
        saves=(x,),
        grads={x: n * h * x_bytes},
        weights=weights,
        weight_copies=copies,
        copies_backward=False,
        saves_after_forward=True,
        fwd_extra=fwd,
        bwd_extra=bwd,
    )


class _Discard(GradSink):
    """A tile's weight gradients: added into the summed ones and gone (the tiled op holds the sums)."""

    def grad_ready(self, tape: Tape, param: str, storage: str) -> None:
        tape.free(storage)


def _tile_extra(s: Setting, layer: int, x: str, x_bytes: int) -> tuple[int, int]:
    """(forward, backward) peaks of one tile of the tiled MLP above what is alive around it: the
    untiled MLP's ops replayed on a tile's tokens, forward without a graph (the cast weights
    already alive), backward as the recompute runs it: the tile's forward with a graph, then its
    backward, each tile weight gradient added into the sums and freed."""
    tile = replace(s, micro_batch=1, seq_len=max(s.tokens // s.tiled_mlp, 1), tiled_mlp=0)
    ops = _mlp_ops(tile, layer, x, x_bytes)
    x_tile = tile.tokens * s.args.hidden_size * x_bytes  # a view of x: there before the tile runs
    params = {p.name: p for p in s.params}
    trainable = {p.name for p in s.params if p.trainable}

    def grad_bytes(name: str) -> int:
        p = params[name]
        return p.numel * (p.itemsize or s.param_bytes)

    peaks = []
    for backward in (False, True):
        tape = Tape()
        graph = Graph(tape, _Discard(), {}, grad_bytes, trainable if backward else set())
        tape.alloc(x, x_tile, ACTIVATIONS)
        if not backward:  # forward: autocast's cache already holds the cast weights
            for op in ops:
                for param, nbytes in op.weight_copies.items():
                    if not tape.alive(f"copy.{param}"):
                        tape.alloc(f"copy.{param}", nbytes, WEIGHT_COPIES)
        base = tape.total
        ns = {x: x}
        graph.requires_grad[x] = backward
        graph.forward(ops, ns, "tile.", exports=("mlp_out",) if backward else ())
        if backward:
            # The recompute's autocast context caches the cast weights for all tiles: none goes
            # with its op's backward.
            for copy in [name for name in tape.storages if name.startswith("copy.")]:
                graph.copy_refs[copy] += 1
            graph.seed_grad(ns["mlp_out"], 0)  # the tile's incoming gradient is a view of the whole one
            graph.backward(ops, ns, "tile.")
        peaks.append(tape.peak.bytes - base)
    return peaks[0], peaks[1]


def _mlp_ops(s: Setting, layer: int, x: str, x_bytes: int) -> list[Op]:
    a, c, i = s.args, s.compute_bytes, s.args.intermediate_size
    mlp = f"model.layers.{layer}.mlp."
    if a.fused_projections:
        ops = linear_ops(s, "gate_up_proj", x, a.hidden_size, x_bytes, "gate_up", 2 * i, mlp + "gate_up_proj.weight")
        ops.append(_split_op("gate_up", "gate_up", ("gate", "up"), s.tokens * 2 * i * _linear_out_bytes(s)))
    else:
        ops = linear_ops(s, "gate_proj", x, a.hidden_size, x_bytes, "gate", i, mlp + "gate_proj.weight")
        ops += linear_ops(s, "up_proj", x, a.hidden_size, x_bytes, "up", i, mlp + "up_proj.weight")
    ops.append(swiglu_op(s))
    ops += linear_ops(s, "down_proj", "act", i, c, "mlp_out", a.hidden_size, mlp + "down_proj.weight")
    return ops


def moe_ops(s: Setting, layer: int, x: str, x_bytes: int) -> list[Op]:
    """trainer.models.moe.MoE.forward on x: the router (logits, fp32 softmax, top-k), the token copies
    gathered in expert order, the grouped gate/up and down matmuls (the stacked expert weights cast to
    the compute dtype once per forward and kept for backward), the gated activation, the product
    with the router weights and the sum back per token; output "mlp_out"."""
    a, c, r = s.args, s.compute_bytes, s.param_bytes
    n, k, e, h, i = s.tokens, a.experts_per_token, a.n_experts, a.hidden_size, a.expert_intermediate_size
    pre = f"model.layers.{layer}.mlp."
    copies = n * k  # token copies
    ob = _linear_out_bytes(s)
    w_bytes = ob if a.router_round_weights else F32  # the router weights: fp32, or the logits' dtype
    ops = linear_ops(s, "router", x, h, x_bytes, "logits", e, pre + "gate.weight")
    ops.append(
        Op(
            "router softmax and top-k",
            inputs=("logits",),
            outputs={"probs": n * e * F32, "topk": n * k * F32, "weights": n * k * w_bytes, "chosen": n * k * 8},
            saves=("probs", "topk", "chosen"),
            grads={"logits": n * e * ob},
            nondiff=("chosen",),
            fwd_extra=n * e * F32 if ob != F32 else 0,  # the logits' fp32 copy
            bwd_extra=2 * n * e * F32,
        )
    )
    xs, xs_bytes = "expert_inputs", x_bytes
    ops.append(Op("gather", inputs=(x,), outputs={xs: copies * h * x_bytes}, grads={x: n * h * x_bytes}))
    if s.autocast and x_bytes != c:
        ops.append(_cast(s, "expert inputs cast", xs, "expert_inputs_c", copies * h, x_bytes, c))
        xs, xs_bytes = "expert_inputs_c", c
    experts = pre + "experts."
    cast = s.autocast and r != c

    def grouped(name, inp, in_bytes, in_features, out, out_features, weight):
        return Op(
            name,
            inputs=(inp,),
            outputs={out: copies * out_features * ob},
            saves_for_weights=(inp,),
            grads={inp: copies * in_features * in_bytes},
            weights=(weight,),
            weight_copies={weight: e * in_features * out_features * c} if cast else {},
            must_save=True,
        )

    ops.append(grouped("experts gate_up", xs, xs_bytes, h, "gate_up", 2 * i, experts + "gate_up_proj"))
    ops.append(_split_op("gate_up", "gate_up", ("gate", "up"), copies * 2 * i * ob))
    ops.append(_gated_op(s, copies * i))
    ops.append(grouped("experts down", "act", c, i, "expert_out", h, experts + "down_proj"))
    prod_bytes = max(ob, w_bytes)
    ops.append(
        Op(
            "router weighting",
            inputs=("expert_out", "weights"),
            outputs={"weighted": copies * h * prod_bytes},
            saves=("expert_out", "weights"),
            grads={"expert_out": copies * h * ob, "weights": n * k * w_bytes},
            bwd_extra=copies * h * prod_bytes,  # the product for the weights' gradient
        )
    )
    weighted = "weighted"
    if prod_bytes != x_bytes:
        ops.append(_cast(s, "weighted cast", weighted, "weighted_x", copies * h, prod_bytes, x_bytes))
        weighted = "weighted_x"
    ops.append(
        Op(
            "index_add",
            inputs=(weighted,),
            outputs={"mlp_out": n * h * x_bytes},
            grads={weighted: copies * h * x_bytes},
        )
    )
    return ops


def residual_elems(s: Setting) -> int:
    """Values of the residual stream on one rank: every token's, or under tensor parallelism the
    rank's part of the sequence."""
    return s.tokens * s.args.hidden_size // s.tensor_parallel


def sequence_gather(s: Setting, x: str, x_bytes: int) -> tuple[list[Op], str]:
    """Tensor parallelism: the all-gather of the sequence-split `x` that attention, the MLP or the
    loss reads whole (their column-parallel matmuls keep it for backward); backward reduce-scatters
    its gradient. ([], x) without tensor parallelism."""
    if s.tensor_parallel == 1:
        return [], x
    n, out = s.tokens * s.args.hidden_size, f"{x} gathered"
    return [Op(f"{x} all-gather", inputs=(x,), outputs={out: n * x_bytes}, grads={x: residual_elems(s) * x_bytes})], out


def sequence_scatter(s: Setting, x: str, x_bytes: int) -> tuple[list[Op], str]:
    """Tensor parallelism: a row-parallel matmul's partial sums over every token, reduce-scattered
    onto the rank's part of the sequence (backward all-gathers the gradient). ([], x) without."""
    if s.tensor_parallel == 1:
        return [], x
    n, out = s.tokens * s.args.hidden_size, f"{x} scattered"
    return [
        Op(f"{x} reduce-scatter", inputs=(x,), outputs={out: residual_elems(s) * x_bytes}, grads={x: n * x_bytes})
    ], out


def _residual_add(s: Setting, name: str, residual: str, x: str, x_bytes: int, out: str, holds=()) -> Op:
    """residual + x, in the residual stream's dtype (the weights')."""
    n, r = residual_elems(s), s.param_bytes
    grads = {} if x_bytes == r else {x: n * x_bytes}  # autograd casts the gradient back to x's dtype
    alias = (residual, x) if x_bytes == r else (residual,)
    return Op(name, inputs=(residual, x), holds=holds, outputs={out: n * r}, grads=grads, alias_grads=alias)


def ffn_ops(s: Setting, layer: int, x: str, x_bytes: int) -> list[Op]:
    """The layer's feed-forward: the experts in an MoE layer, else the MLP."""
    return moe_ops(s, layer, x, x_bytes) if s.args.is_moe_layer(layer) else mlp_ops(s, layer, x, x_bytes)


def block_ops(s: Setting, i: int) -> list[Op]:
    """One decoder layer: input "x", output "out" (trainer.models.llama.DecoderLayer.forward, with
    the family's norm placement: "pre" (Llama), "post" (OLMo 2) or "sandwich" (Gemma)). Under
    tensor parallelism attention and the MLP read their input gathered and hand their output back
    reduce-scattered (sequence_gather, sequence_scatter); the norms and adds see the rank's part."""
    a, r = s.args, s.param_bytes
    ob = _linear_out_bytes(s)
    pre = f"model.layers.{i}."
    placement = a.norm_placement

    def attention(x: str) -> tuple[list[Op], str]:
        gather, x = sequence_gather(s, x, r)
        ops = gather + attention_ops(s, i, x, r)
        scatter, out = sequence_scatter(s, "attn_out", ob)
        return ops + scatter, out

    def ffn(x: str) -> tuple[list[Op], str]:
        gather, x = sequence_gather(s, x, r)
        ops = gather + ffn_ops(s, i, x, r)
        scatter, out = sequence_scatter(s, "mlp_out", ob)
        return ops + scatter, out

    def norm(name: str, x: str, y: str, rstd: str, **kwargs) -> Op:
        return rms_op(s, name, x, y, rstd, pre + name + ".weight", **kwargs)

    if placement == "post":  # x + norm(attention(x)), then h + norm(mlp(h))
        ops, attn_out = attention("x")
        ops.append(norm("post_attention_layernorm", attn_out, "an", "rstd_an", x_bytes=ob))
        ops.append(_residual_add(s, "attention residual add", "x", "an", r, "h"))
        mlp, mlp_out = ffn("h")
        ops += mlp
        ops.append(norm("post_feedforward_layernorm", mlp_out, "mn", "rstd_mn", x_bytes=ob))
        ops.append(_residual_add(s, "residual add", "h", "mn", r, "out"))
        return ops
    ops = [norm("input_layernorm", "x", "y1", "rstd1")]
    attn, attn_out = attention("y1")
    ops += attn
    if placement == "sandwich":  # norms on the way out of attention and into and out of the MLP
        ops.append(norm("post_attention_layernorm", attn_out, "an", "rstd_an", x_bytes=ob))
        ops.append(norm("pre_feedforward_layernorm", "an", "y2", "rstd2", residual="x", total="h", x_bytes=ob))
        mlp, mlp_out = ffn("y2")
        ops += mlp
        ops.append(norm("post_feedforward_layernorm", mlp_out, "mn", "rstd_mn", x_bytes=ob))
        ops.append(_residual_add(s, "residual add", "h", "mn", ob, "out", holds=(attn_out,)))
        return ops
    ops.append(norm("post_attention_layernorm", attn_out, "y2", "rstd2", residual="x", total="h", x_bytes=ob))
    mlp, mlp_out = ffn("y2")
    ops += mlp
    # `attn_out` stays alive until the layer returns (a local variable of DecoderLayer.forward).
    ops.append(_residual_add(s, "residual add", "h", mlp_out, ob, "out", holds=(attn_out,)))
    return ops


def embedding_ops(s: Setting) -> list[Op]:
    """The embedding lookup, Gemma's scaling by sqrt(hidden) and NEFTune's noise; output "x". Under
    tensor parallelism each rank looks up its vocabulary rows for every token (zeros elsewhere) and
    the sums are reduce-scattered onto its part of the sequence."""
    nbytes = residual_elems(s) * s.param_bytes
    partial_sums = s.tokens * s.args.hidden_size * s.param_bytes if s.tensor_parallel > 1 else 0
    steps = ["embed_tokens"] + ["embed scale"] * s.args.embed_scale + ["neftune noise"] * s.neftune
    names = [f"x{i}" for i in range(len(steps) - 1)] + ["x"]
    ops = [
        Op("embed_tokens", outputs={names[0]: nbytes}, weights=("model.embed_tokens.weight",), fwd_extra=partial_sums)
    ]
    for step, src, out in zip(steps[1:], names, names[1:]):
        if step == "embed scale":  # a product by a scalar tensor: its gradient is a new tensor too
            ops.append(Op(step, inputs=(src,), outputs={out: nbytes}, grads={src: nbytes}))
        else:  # plus a uniform noise tensor of the embeddings' size (trainer.models.llama.neftune_noise)
            ops.append(Op(step, inputs=(src,), outputs={out: nbytes}, fwd_extra=nbytes, alias_grads=(src,)))
    return ops


LOSS_OP = "fused cross-entropy"  # the fused loss's op: its forward is where the logit chunks live


def loss_hidden_bytes(s: Setting) -> int:
    """Bytes per value of the hidden states the loss reads: the compute dtype when autocast casts
    fp32/bf16 weights' hidden states down, else the weights'."""
    r, c = s.param_bytes, s.compute_bytes
    return c if s.autocast and r != c else r


def logits_materialized(s: Setting) -> bool:
    """Whether the run's loss computes the whole logits: kernels.fused_ce=false, or the fused loss's
    own choice for logits as small as these (trainer.ops.cross_entropy.materializes_logits). The
    vocabulary-parallel loss of tensor parallelism always chunks."""
    if s.kernels.materialize_logits:
        return True
    if s.tensor_parallel > 1:
        return False
    triton = s.runs_triton(s.kernels.fused_ce)
    return materializes_logits(s.tokens, s.args.vocab_size, loss_hidden_bytes(s), triton, s.kernels.ce_chunk_bytes)


def ce_chunk(s: Setting) -> tuple[int, int, int]:
    """(tokens per chunk, kept and working bytes per token of a chunk) of the fused loss, as
    trainer.ops.cross_entropy chunks it: the shape's chunk, capped by KernelChoice.ce_chunk_bytes
    when the run sets one."""
    a, hb = s.args, loss_hidden_bytes(s)
    triton = s.runs_triton(s.kernels.fused_ce)
    kept, working = chunk_buffers(a.vocab_size, hb, triton, a.final_softcap is not None)
    tokens = chunk_tokens(
        s.tokens,
        a.hidden_size,
        a.vocab_size,
        hb,
        s.device == "cuda" and triton,
        budget_bytes=s.kernels.ce_chunk_bytes,
        token_bytes=kept + working,
    )
    return tokens, kept, working


def loss_ops(s: Setting) -> list[Op]:
    """The final norm and the loss (the fused chunked cross-entropy, or materialised logits)."""
    a, c, r = s.args, s.compute_bytes, s.param_bytes
    n, v, h = s.tokens, a.vocab_size, a.hidden_size
    head = lm_head_name(a)
    ops = [rms_op(s, "norm", "x", "hidden", "rstd", "model.norm.weight")]
    if s.tensor_parallel > 1:
        return ops + vocab_parallel_loss_ops(s)
    hidden, hb = "hidden", r
    if s.autocast and r != c:  # the loss casts its inputs as a linear layer would
        ops.append(Op("hidden cast", inputs=("hidden",), outputs={"hidden_c": n * h * c}, grads={"hidden": n * h * r}))
        hidden, hb = "hidden_c", c
    copies = {head: v * h * c} if s.autocast and s.param_bytes != c else {}
    if not logits_materialized(s):
        # The chunks' logits and gradients at their most (the op's chunk_buffers and
        # chunk_peak_bytes: the first chunk alone, then each beside the previous one's gradient).
        # Left out when the planner asks how much room the chunks have (Setting.loss_chunks=False).
        tokens, kept, working = ce_chunk(s)
        chunks = chunk_peak_bytes(n, tokens, kept, working) if s.loss_chunks else 0
        ops.append(_gradients_in_forward_loss(s, LOSS_OP, hidden, hb, n * F32 + chunks))  # per-token losses, chunks
        return ops
    # Materialised (logits_materialized): logits = lm_head(hidden), upcast to fp32, F.cross_entropy
    ops.append(
        Op(
            "lm_head",
            inputs=(hidden,),
            outputs={"logits": n * v * c},
            saves_for_weights=(hidden,),
            grads={hidden: n * h * hb},
            weights=(head,),
            weight_copies=copies,
        )
    )
    logits = "logits"
    if c != F32:
        ops.append(
            Op("logits upcast", inputs=("logits",), outputs={"logits32": n * v * F32}, grads={"logits": n * v * c})
        )
        logits = "logits32"
    if a.final_softcap is not None:  # cap * tanh(logits / cap): tanh keeps its output
        elems = n * v * F32
        ops.append(Op("logits / cap", inputs=(logits,), outputs={"scaled": elems}, grads={logits: elems}))
        ops.append(Op("tanh", inputs=("scaled",), outputs={"tanh": elems}, saves=("tanh",), grads={"scaled": elems}))
        ops.append(Op("cap * tanh", inputs=("tanh",), outputs={"capped": elems}, grads={"tanh": elems}))
        logits = "capped"
    ops.append(
        Op("log_softmax", inputs=(logits,), outputs={"logp": n * v * F32}, saves=("logp",), grads={logits: n * v * F32})
    )
    ops.append(Op("nll_loss", inputs=("logp",), outputs={"loss": F32}, grads={"logp": n * v * F32}))
    return ops


def vocab_parallel_loss_ops(s: Setting) -> list[Op]:
    """trainer.ops.vocab_parallel_cross_entropy, summed, on the gathered hidden states and this
    rank's vocabulary rows: like the fused loss, it makes both gradients in its forward (the hidden
    states' in their dtype, the weight's in fp32) and backward only scales them; per chunk, the
    logits and their exponentials in fp32, beside the per-token losses and log-sum-exps."""
    a, c, r = s.args, s.compute_bytes, s.param_bytes
    n, v, h = s.tokens, a.vocab_size, a.hidden_size  # v: this rank's rows
    ops, hidden = sequence_gather(s, "hidden", r)
    hb = r
    if s.autocast and r != c:  # cast as a linear layer would, after the gather
        ops.append(Op("hidden cast", inputs=(hidden,), outputs={"hidden_c": n * h * c}, grads={hidden: n * h * r}))
        hidden, hb = "hidden_c", c
    chunk = vocab_parallel_chunk(n, h, v) * v * F32
    ops.append(_gradients_in_forward_loss(s, "vocab-parallel cross-entropy", hidden, hb, 2 * n * F32 + 2 * chunk))
    return ops


def _gradients_in_forward_loss(s: Setting, name: str, hidden: str, hidden_bytes: int, working: int) -> Op:
    """A loss that makes both gradients in its forward (the fused loss, the vocabulary-parallel one):
    backward only scales those buffers in place. The hidden states' gradient is kept in their dtype
    (`hidden_bytes`), the head's in fp32, and a frozen head (LoRA) gets none: the op only computes
    what trains. Under autocast the head is cast once for the forward. `working`: the forward's
    temporaries besides that cast weight."""
    a, c = s.args, s.compute_bytes
    n, v, h = s.tokens, a.vocab_size, a.hidden_size
    head = lm_head_name(a)
    copies = {head: v * h * c} if s.autocast and s.param_bytes != c else {}
    head_trains = any(p.name == head and p.trainable for p in s.params)
    stash = {"grad_hidden_stash": n * h * hidden_bytes} | ({"grad_weight_stash": v * h * F32} if head_trains else {})
    return Op(
        name,
        inputs=(hidden,),
        outputs={"loss": F32, **stash},
        saves=tuple(stash),
        grads_from={hidden: "grad_hidden_stash"},
        weights=(head,),
        weight_grad_from={head: "grad_weight_stash"} if head_trains else {},
        weight_copies=copies,
        copies_saved=False,
        nondiff=tuple(stash),
        fwd_extra=working + sum(copies.values()),
    )


def _rotary_embeddings(s: Setting) -> int:
    """RotaryEmbedding modules: one, and Gemma 3's second for its sliding layers."""
    return 1 if s.args.rope_local_theta is None else 2


def rotary_table_bytes(s: Setting) -> int:
    """cos and sin for every position up to max_seq_len (fp32), cached by the model, and inv_freq."""
    d = s.args.rotary_dim or s.args.head_dim
    if s.document_mask:
        return _rotary_embeddings(s) * d // 2 * F32
    return _rotary_embeddings(s) * (2 * s.args.max_seq_len * d * F32 + d // 2 * F32)


def per_batch_position_bytes(s: Setting) -> int:
    """With position_ids (packed documents): cos and sin per token, and the attention mask on CPU."""
    if not s.document_mask:
        return 0
    tables = _rotary_embeddings(s) * 2 * s.tokens * (s.args.rotary_dim or s.args.head_dim) * F32
    mask = s.micro_batch * s.seq_len * s.seq_len if s.device == "cpu" else 0  # bool (B, 1, T, T)
    return tables + mask


def batch_bytes(s: Setting) -> int:
    """Token ids and labels (int64) of one micro-batch, plus positions and document ids when packed."""
    tensors = 4 if s.document_mask else 2
    return tensors * s.tokens * 8


def param_uses(s: Setting) -> dict[str, int]:
    return {"model.embed_tokens.weight": 2} if s.args.tie_embeddings else {}
