"""The decoder of every family (trainer/models/families), built from trainer.ops; ModelArgs'
switches choose each family's differences (q/k norms, norm placement, sliding windows, biases).

Module and parameter names follow the Hugging Face classes (LlamaForCausalLM, Qwen3ForCausalLM,
Olmo2ForCausalLM, ...), so a state dict moves between the two without renaming.
"""

from __future__ import annotations

import functools
import math
import zlib
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from trainer import ops
from trainer.constants import IGNORE_INDEX
from trainer.models.config import ModelArgs
from trainer.models.moe import Experts, MoE, load_balancing_loss
from trainer.ops.dispatch import KernelChoice


class RMSNorm(nn.Module):
    """RMSNorm with the family's offset and rounding (ModelArgs.norm_offset, norm_cast)."""

    def __init__(self, dim: int, args: ModelArgs, kernels: KernelChoice):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.offset, self.cast = args.norm_eps, args.norm_offset, args.norm_cast
        self.kernels = kernels

    def forward(self, x):
        return ops.rms_norm(x, self.weight, self.eps, offset=self.offset, cast=self.cast, force=self.kernels.rms_norm)

    def add_forward(self, x, residual):
        """(x + residual, this norm of it), in one pass."""
        return ops.add_rms_norm(
            x, residual, self.weight, self.eps, offset=self.offset, cast=self.cast, force=self.kernels.rms_norm
        )


class RotaryEmbedding(nn.Module):
    """cos/sin tables in fp32 for every position up to max_seq_len."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.register_buffer("inv_freq", torch.empty((args.rotary_dim or args.head_dim) // 2), persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        # Called again after a model built on the meta device is materialised: this buffer is not
        # in any checkpoint.
        self.inv_freq = rope_inv_freq(self.args).to(self.inv_freq.device)
        self.max_seq_len = self.args.max_seq_len
        self._cache = None

    def _apply(self, fn, recurse=True):
        # model.to(bf16) would round the frequencies (a visible angle error at long positions):
        # recompute them in fp32 on the buffer's new device instead.
        super()._apply(fn, recurse)
        if self.inv_freq.device.type != "meta":
            self.reset_parameters()
        return self

    def forward(self, seq_len: int, position_ids: torch.Tensor | None, device):
        if position_ids is not None:
            freqs = position_ids.float()[..., None] * self.inv_freq  # (batch, seq, dim/2)
        else:
            cos, sin = self._table(device)
            return cos[:seq_len], sin[:seq_len]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def _table(self, device):
        if self._cache is None or self._cache[0].device != torch.device(device):
            with torch.autocast(device_type=torch.device(device).type, enabled=False):
                pos = torch.arange(self.max_seq_len, device=device, dtype=torch.float32)
                freqs = torch.outer(pos, self.inv_freq.to(device))
                emb = torch.cat((freqs, freqs), dim=-1)
                self._cache = (emb.cos(), emb.sin())
        return self._cache


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, kernels: KernelChoice):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        h, k_width = args.hidden_size, self.n_kv_heads * self.head_dim
        self.widths = (self.n_heads * self.head_dim, k_width, k_width)  # q, k, v
        self.fused = args.fused_projections
        if self.fused:  # Phi-3's qkv_proj
            self.qkv_proj = nn.Linear(h, sum(self.widths), bias=args.qkv_bias)
        else:
            self.q_proj = nn.Linear(h, self.widths[0], bias=args.qkv_bias)
            self.k_proj = nn.Linear(h, k_width, bias=args.qkv_bias)
            self.v_proj = nn.Linear(h, k_width, bias=args.qkv_bias)
        self.rotary_dim = args.rotary_dim
        self.scale = None if args.query_pre_attn_scalar is None else args.query_pre_attn_scalar**-0.5
        self.softcap = args.attn_softcap
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)
        self.qk_norm = args.qk_norm
        if args.qk_norm != "none":  # over each head (Qwen3) or the whole projection (OLMo 2)
            per_head = args.qk_norm == "head"
            q_dim, k_dim = (self.head_dim, self.head_dim) if per_head else (self.n_heads * self.head_dim, k_width)
            self.q_norm = RMSNorm(q_dim, args, kernels)
            self.k_norm = RMSNorm(k_dim, args, kernels)
        self.kernels = kernels

    def forward(self, x, cos, sin, attn_mask):
        b, t, _ = x.shape
        if self.fused:
            q, k, v = self.qkv_proj(x).split(self.widths, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        # -1: under tensor parallelism a rank holds n_heads / N of the heads (trainer/parallel/tensor_parallel.py).
        q = q.view(b, t, -1, self.head_dim)
        k = k.view(b, t, -1, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(b, t, -1, self.head_dim).transpose(1, 2)
        if self.rotary_dim is None:
            q, k = ops.rope(q, k, cos, sin, force=self.kernels.rope)
        else:  # partial rotary (Phi-3): the first rotary_dim dimensions of each head turn, the rest pass
            r = self.rotary_dim
            q_rot, k_rot = ops.rope(q[..., :r], k[..., :r], cos, sin, force=self.kernels.rope)
            q, k = torch.cat((q_rot, q[..., r:]), dim=-1), torch.cat((k_rot, k[..., r:]), dim=-1)
        gqa = self.n_kv_heads != self.n_heads
        if isinstance(attn_mask, BlockMask):
            score_mod = None if self.softcap is None else softcap_score_mod(self.softcap)
            flex = compiled_flex_attention()
            out = flex(q, k, v, score_mod=score_mod, block_mask=attn_mask, scale=self.scale, enable_gqa=gqa)
        elif self.softcap is not None:  # SDPA has no softcap: the scores are computed here
            out = softcapped_attention(q, k, v, attn_mask, self.scale, self.softcap)
        elif attn_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, kernels: KernelChoice):
        super().__init__()
        self.fused = args.fused_projections
        if self.fused:  # Phi-3's gate_up_proj: gate first, up second
            self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        else:
            self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
            self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)
        self.activation = args.mlp_activation
        self.kernels = kernels

    def forward(self, x):
        # The two halves of gate_up_proj are strided views: the kernel reads them without a copy.
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1) if self.fused else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(ops.gated_activation(gate, up, self.activation, force=self.kernels.swiglu))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, kernels: KernelChoice, layer: int):
        super().__init__()
        self.self_attn = Attention(args, kernels)
        self.mlp = MoE(args, kernels) if args.is_moe_layer(layer) else MLP(args, kernels)
        self.norm_placement = placement = args.norm_placement
        if placement in ("pre", "sandwich"):
            self.input_layernorm = RMSNorm(args.hidden_size, args, kernels)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args, kernels)
        if placement == "sandwich":
            self.pre_feedforward_layernorm = RMSNorm(args.hidden_size, args, kernels)
        if placement in ("post", "sandwich"):
            self.post_feedforward_layernorm = RMSNorm(args.hidden_size, args, kernels)

    def forward(self, x, cos, sin, attn_mask=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the layer's output, an MoE layer's routing figures or None)."""
        if self.norm_placement == "post":  # OLMo 2: x + norm(attention(x)), then x + norm(mlp(x))
            h = x + self.post_attention_layernorm(self.self_attn(x, cos, sin, attn_mask))
            ffn, routing = self._ffn(h)
            return h + self.post_feedforward_layernorm(ffn), routing
        attn_out = self.self_attn(self.input_layernorm(x), cos, sin, attn_mask)
        if self.norm_placement == "sandwich":  # Gemma: normed on the way in and on the way out of each
            h, normed = self.pre_feedforward_layernorm.add_forward(self.post_attention_layernorm(attn_out), x)
            ffn, routing = self._ffn(normed)
            return h + self.post_feedforward_layernorm(ffn), routing
        h, normed = self.post_attention_layernorm.add_forward(attn_out, x)
        ffn, routing = self._ffn(normed)
        return h + ffn, routing

    def _ffn(self, x) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.mlp(x) if isinstance(self.mlp, MoE) else (self.mlp(x), None)


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs, kernels: KernelChoice):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size, padding_idx=args.padding_idx)
        self.layers = nn.ModuleList(DecoderLayer(args, kernels, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.hidden_size, args, kernels)
        self.rotary_emb = RotaryEmbedding(args)
        if args.rope_local_theta is not None:  # Gemma 3's sliding layers: their own base, no scaling
            self.rotary_emb_local = RotaryEmbedding(replace(args, rope_theta=args.rope_local_theta, rope_scaling=None))
        self.args = args
        self.neftune_alpha = 0.0  # > 0: NEFTune noise on the input embeddings in training (see neftune_noise)
        # The last forward's routing figures of the MoE layers, (MoE layers, 2, n_experts) (see
        # MoE.forward), and the tokens each layer routed; None for a dense model.
        self.routing: torch.Tensor | None = None
        self.routed_tokens = 0

    def forward(self, input_ids, position_ids=None, document_ids=None):
        seq_len, device, args = input_ids.shape[1], input_ids.device, self.args
        rope = {None: self.rotary_emb(seq_len, position_ids, device)}
        if args.rope_local_theta is not None:
            rope["local"] = self.rotary_emb_local(seq_len, position_ids, device)
        # One mask per distinct window, built once and shared by the layers that use it.
        windows = [args.window_of(i) for i in range(len(self.layers))]
        flex = args.attn_softcap is not None
        masks = {w: attention_mask(document_ids, w, seq_len, device, flex_on_cuda=flex) for w in set(windows)}
        x = self.embed_tokens(input_ids)
        if args.embed_scale:  # Gemma: sqrt(hidden) rounded to the embeddings' dtype first, as transformers does
            x = x * torch.tensor(args.hidden_size**0.5, dtype=x.dtype).item()
        if self.training and self.neftune_alpha > 0:
            x = neftune_noise(x, self.neftune_alpha)
        routings = []
        for layer, window in zip(self.layers, windows):
            cos, sin = rope["local" if window is not None and "local" in rope else None]
            x, routing = layer(x, cos, sin, masks[window])
            if routing is not None:
                routings.append(routing)
        self.routing = torch.stack(routings) if routings else None
        self.routed_tokens = input_ids.numel()
        return self.norm(x)


def neftune_noise(embeddings: torch.Tensor, alpha: float) -> torch.Tensor:
    """NEFTune (Jain et al., "NEFTune: Noisy Embeddings Improve Instruction Finetuning", arXiv:2310.05914):
    `embeddings` (batch, seq, hidden) plus noise uniform in [-m, m], m = alpha / sqrt(seq * hidden), as Hugging
    Face Trainer's neftune_noise_alpha adds it (seq: the batch's padded or packed length)."""
    magnitude = alpha / math.sqrt(embeddings.shape[1] * embeddings.shape[2])
    return embeddings + torch.empty_like(embeddings).uniform_(-magnitude, magnitude)


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Rotary frequencies in fp32, with Hugging Face's "linear" or "llama3" (Llama 3.1) scaling applied."""
    dim = args.rotary_dim or args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scaling = args.rope_scaling
    if not scaling:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    # llama3: long wavelengths are slowed down by `factor`, short ones kept, the band between blended.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(in_band, blended, scaled)


@functools.cache
def compiled_flex_attention():
    # Flex attention is only fast compiled; compiled once per process, on first use.
    return torch.compile(flex_attention, dynamic=False)


@functools.cache
def compiled_create_block_mask():
    # Eager create_block_mask evaluates the mask function over the whole (batch, seq, seq) grid in
    # many small ops; compiled, that becomes a few fused kernels (torchtitan compiles it the same way,
    # torchtitan/models/attention.py). Compiled once per process; a new batch of document ids
    # reuses the compiled code (only a new shape recompiles).
    return torch.compile(create_block_mask)


def softcap_score_mod(softcap: float):
    """Flex attention's score function for attention-logit softcapping (Gemma 2)."""

    def capped(score, b, h, q_idx, kv_idx):
        return softcap * torch.tanh(score / softcap)

    return capped


def softcapped_attention(q, k, v, attn_mask, scale: float | None, softcap: float) -> torch.Tensor:
    """Attention with softcap * tanh(scores / softcap) before the softmax (fp32), as transformers'
    eager Gemma 2 attention computes it; `attn_mask` is boolean (True: may attend) or None (causal)."""
    t = q.shape[-2]
    if attn_mask is None:
        attn_mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~attn_mask, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def mask_mod(document_ids: torch.Tensor | None, window: int | None):
    """Flex attention's mask function: causal; never across a document (packed rows); and with a
    sliding window, a query sees itself and the window - 1 keys before it (transformers' rule)."""

    def allowed(b, h, q_idx, kv_idx):
        keep = q_idx >= kv_idx
        if document_ids is not None:
            keep = keep & (document_ids[b, q_idx] == document_ids[b, kv_idx])
        if window is not None:
            keep = keep & (q_idx - kv_idx < window)
        return keep

    return allowed


def attention_mask(
    document_ids: torch.Tensor | None, window: int | None, seq_len: int, device, flex_on_cuda: bool = False
) -> torch.Tensor | BlockMask | None:
    """The attention mask of a forward, shared by every layer with this window. None for plain causal
    attention (SDPA's is_causal) unless `flex_on_cuda` asks for flex attention on CUDA anyway (a
    softcap, which SDPA lacks); on CUDA a flex-attention block mask (it skips the blocks no query can
    see); elsewhere the exact boolean SDPA mask, (batch or 1, 1, seq, seq) (flex attention has no
    backward on CPU)."""
    on_cuda = torch.device(device).type == "cuda"
    if document_ids is None and (window is None or window >= seq_len) and not (flex_on_cuda and on_cuda):
        return None
    if on_cuda:
        batch = 1 if document_ids is None else document_ids.shape[0]
        return compiled_create_block_mask()(
            mask_mod(document_ids, window), batch, None, seq_len, seq_len, device=device
        )
    positions = torch.arange(seq_len, device=device)
    offset = positions[:, None] - positions[None, :]  # query position - key position
    keep = offset >= 0
    if window is not None:
        keep = keep & (offset < window)
    if document_ids is None:
        return keep[None, None]
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]
    return (same_doc & keep)[:, None]


class Transformer(nn.Module):
    """model(input_ids) -> logits; model(input_ids, labels=labels) -> loss (mean over non-ignored labels)."""

    # The config.json and generation_config.json of the Hugging Face folder the model was loaded
    # from (load_hf), so that save_hf hands on their keys; None for a model built here.
    hf_config: dict | None = None
    hf_generation_config: dict | None = None

    def __init__(self, args: ModelArgs, kernels: KernelChoice | None = None):
        super().__init__()
        self.args = args
        self.kernels = kernels or KernelChoice()
        self.model = LlamaModel(args, self.kernels)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.tie_weights()
        # Tensor parallelism (trainer/parallel/tensor_parallel.py): the hidden states are a DTensor and
        # each rank holds rows of lm_head.weight, so the loss is the vocabulary-parallel one.
        self.vocab_parallel = False

    def tie_weights(self) -> None:
        # Moving a module between devices (to_empty, FSDP) can leave two Parameters: tie them again.
        if self.args.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def materialize_rotary(self, device) -> None:
        """After building on the meta device: the rotary tables' (non-persistent) frequencies, recomputed."""
        for module in self.modules():
            if isinstance(module, RotaryEmbedding):
                module.to_empty(device=device)

    def set_kernels(self, kernels: KernelChoice) -> None:
        """Switches every op of the model at once: each module that runs an op holds the choice."""
        self.kernels = kernels
        for module in self.modules():
            if isinstance(module, (RMSNorm, Attention, MLP, Experts)):
                module.kernels = kernels

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02) -> None:
        """Random initial weights, each parameter from its own generator (initial_weights)."""
        for _, param, values in self.initial_weights(seed, std):
            param.copy_(values)

    def initial_weights(self, seed: int = 0, std: float = 0.02):
        """(name, parameter, its whole initial value on the CPU in fp32) for every parameter, one at
        a time. Each value comes from a generator seeded with `seed` and the parameter's name, so it
        does not depend on the order, on the other parameters, or on how the model is sharded: a
        sharded model (trainer/parallel/materialize.py) writes each rank's rows of the same values."""
        # Residual-branch outputs are scaled by 1/sqrt(2 * n_layers) (GPT-2 paper, section 2.3) so the
        # residual stream's variance does not grow with depth.
        out_std = std / math.sqrt(2 * self.args.n_layers)
        owners = {}
        for module_name, module in self.named_modules():
            for leaf, param in module.named_parameters(recurse=False):
                owners.setdefault(id(param), (module_name, module, leaf))
        for name, param in self.named_parameters():
            module_name, module, leaf = owners[id(param)]
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            values = torch.empty(param.shape)
            if isinstance(module, RMSNorm):
                values.fill_(1.0 - module.offset)  # a scale of 1 either way
            elif leaf == "bias":
                values.zero_()
            else:
                is_out = module_name.endswith(("o_proj", "down_proj")) or (
                    isinstance(module, Experts) and leaf == "down_proj"
                )
                values.normal_(0.0, out_std if is_out else std, generator=generator)
            yield name, param, values

    def expert_assignments(self) -> torch.Tensor | None:
        """The token copies each expert of each MoE layer received in the last forward, (MoE layers,
        n_experts); None for a dense model."""
        routing = self.model.routing
        return None if routing is None else routing[:, 0]

    def aux_loss(self) -> torch.Tensor | None:
        """The load-balancing loss of the last forward (trainer.models.moe), unweighted; None
        for a dense model. The training loss adds args.router_aux_loss_coef times it."""
        routing = self.model.routing
        return None if routing is None else load_balancing_loss(routing, self.model.routed_tokens, self.args.n_experts)

    def forward(
        self,
        input_ids,
        labels=None,
        *,
        position_ids=None,
        document_ids=None,
        reduction="mean",
        normalizer=None,
        ignore_index: int = IGNORE_INDEX,
    ):
        problem = self.args.seq_len_problem(input_ids.shape[1])
        if problem:
            raise ValueError(f"a sequence of {input_ids.shape[1]} tokens {problem}")
        hidden = self.model(input_ids, position_ids, document_ids)
        cap = self.args.final_softcap
        if labels is None:
            logits = self.lm_head(hidden)
            return logits if cap is None else cap * torch.tanh(logits / cap)
        if self.kernels.materialize_logits:
            logits = self.lm_head(hidden)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 logits upcast
            if cap is not None:
                logits = cap * torch.tanh(logits / cap)
            loss = F.cross_entropy(
                logits.flatten(0, 1),
                labels.flatten(),
                ignore_index=ignore_index,
                reduction="sum" if reduction == "mean" else reduction,
            )
            if reduction == "none":
                return loss.view(labels.shape)
            if reduction == "mean":
                count = (labels != ignore_index).sum().clamp(min=1) if normalizer is None else normalizer
                loss = loss / count
            return loss
        if self.vocab_parallel:
            return vocab_parallel_loss(hidden, self.lm_head.weight, labels, ignore_index, reduction, normalizer, cap)
        return ops.linear_cross_entropy(
            hidden,
            self.lm_head.weight,
            labels,
            ignore_index,
            reduction,
            bias=self.lm_head.bias,
            normalizer=normalizer,
            softcap=cap,
            chunk_bytes=self.kernels.ce_chunk_bytes,
            force=self.kernels.fused_ce,
        )


def vocab_parallel_loss(hidden, weight, labels, ignore_index: int, reduction: str, normalizer, softcap) -> torch.Tensor:
    """The loss of a tensor-parallel model: `hidden` a DTensor sharded along the sequence, `weight`
    one sharded by vocabulary rows. Every rank gathers the hidden states of all positions (the
    gradient that returns is each rank's partial sum, reduce-scattered back), and computes the
    logits of its own rows only."""
    from torch.distributed.tensor import Partial, Replicate
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from trainer.ops.vocab_parallel_cross_entropy import vocab_parallel_cross_entropy

    mesh = weight.device_mesh
    everywhere = [Replicate()] * mesh.ndim
    local_hidden = hidden.redistribute(hidden.device_mesh, everywhere).to_local(grad_placements=[Partial()] * mesh.ndim)
    _, offset = compute_local_shape_and_global_offset(weight.shape, mesh, weight.placements)
    loss = vocab_parallel_cross_entropy(
        local_hidden,
        weight.to_local(),
        labels,
        vocab_start=offset[0],
        group=mesh.get_group(),
        ignore_index=ignore_index,
        softcap=softcap,
        reduction="none" if reduction == "none" else "sum",
    )
    if reduction in ("none", "sum"):
        return loss
    total = loss
    return total / ((labels != ignore_index).sum().clamp(min=1) if normalizer is None else normalizer)
