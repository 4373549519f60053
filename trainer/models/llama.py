"""The decoder of every family (trainer/models/families), built from trainer.ops; ModelArgs'
switches choose each family's differences (q/k norms, norm placement, sliding windows, biases).

Module and parameter names follow the Hugging Face classes (LlamaForCausalLM, Qwen3ForCausalLM,
Olmo2ForCausalLM, ...), so a state dict moves between the two without renaming.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from trainer import ops
from trainer.constants import IGNORE_INDEX
from trainer.models.config import ModelArgs
from trainer.ops.dispatch import KernelChoice


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, kernels: KernelChoice):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.kernels = kernels

    def forward(self, x):
        return ops.rms_norm(x, self.weight, self.eps, force=self.kernels.rms_norm)


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
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)
        self.qk_norm = args.qk_norm
        if args.qk_norm != "none":  # over each head (Qwen3) or the whole projection (OLMo 2)
            per_head = args.qk_norm == "head"
            q_dim, k_dim = (self.head_dim, self.head_dim) if per_head else (self.n_heads * self.head_dim, k_width)
            self.q_norm = RMSNorm(q_dim, args.norm_eps, kernels)
            self.k_norm = RMSNorm(k_dim, args.norm_eps, kernels)
        self.kernels = kernels

    def forward(self, x, cos, sin, attn_mask):
        b, t, _ = x.shape
        if self.fused:
            q, k, v = self.qkv_proj(x).split(self.widths, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, t, self.n_heads, self.head_dim)
        k = k.view(b, t, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary_dim is None:
            q, k = ops.rope(q, k, cos, sin, force=self.kernels.rope)
        else:  # partial rotary (Phi-3): the first rotary_dim dimensions of each head turn, the rest pass
            r = self.rotary_dim
            q_rot, k_rot = ops.rope(q[..., :r], k[..., :r], cos, sin, force=self.kernels.rope)
            q, k = torch.cat((q_rot, q[..., r:]), dim=-1), torch.cat((k_rot, k[..., r:]), dim=-1)
        gqa = self.n_kv_heads != self.n_heads
        if attn_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif isinstance(attn_mask, BlockMask):
            out = compiled_flex_attention()(q, k, v, block_mask=attn_mask, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
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
        self.kernels = kernels

    def forward(self, x):
        # The two halves of gate_up_proj are strided views: the SwiGLU kernel reads them without a copy.
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1) if self.fused else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(ops.swiglu(gate, up, force=self.kernels.swiglu))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, kernels: KernelChoice):
        super().__init__()
        self.self_attn = Attention(args, kernels)
        self.mlp = MLP(args, kernels)
        self.norm_placement = args.norm_placement
        if args.norm_placement == "pre":
            self.input_layernorm = RMSNorm(args.hidden_size, args.norm_eps, kernels)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.norm_eps, kernels)
        if args.norm_placement == "post":
            self.post_feedforward_layernorm = RMSNorm(args.hidden_size, args.norm_eps, kernels)

    def forward(self, x, cos, sin, attn_mask=None):
        if self.norm_placement == "post":  # OLMo 2: x + norm(attention(x)), then x + norm(mlp(x))
            h = x + self.post_attention_layernorm(self.self_attn(x, cos, sin, attn_mask))
            return h + self.post_feedforward_layernorm(self.mlp(h))
        attn_out = self.self_attn(self.input_layernorm(x), cos, sin, attn_mask)
        norm = self.post_attention_layernorm
        h, normed = ops.add_rms_norm(attn_out, x, norm.weight, norm.eps, force=norm.kernels.rms_norm)
        return h + self.mlp(normed)


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs, kernels: KernelChoice):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, kernels) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.hidden_size, args.norm_eps, kernels)
        self.rotary_emb = RotaryEmbedding(args)
        self.args = args
        self.neftune_alpha = 0.0  # > 0: NEFTune noise on the input embeddings in training (see neftune_noise)

    def forward(self, input_ids, position_ids=None, document_ids=None):
        seq_len = input_ids.shape[1]
        cos, sin = self.rotary_emb(seq_len, position_ids, input_ids.device)
        # One mask per distinct window, built once and shared by the layers that use it.
        windows = [self.args.window_of(i) for i in range(len(self.layers))]
        masks = {w: attention_mask(document_ids, w, seq_len, input_ids.device) for w in set(windows)}
        x = self.embed_tokens(input_ids)
        if self.training and self.neftune_alpha > 0:
            x = neftune_noise(x, self.neftune_alpha)
        for layer, window in zip(self.layers, windows):
            x = layer(x, cos, sin, masks[window])
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
    document_ids: torch.Tensor | None, window: int | None, seq_len: int, device
) -> torch.Tensor | BlockMask | None:
    """The attention mask of a forward, shared by every layer with this window. None for plain causal
    attention (SDPA's is_causal); on CUDA a flex-attention block mask (it skips the blocks no query
    can see); elsewhere the exact boolean SDPA mask, (batch or 1, 1, seq, seq) (flex attention has no
    backward on CPU)."""
    if document_ids is None and (window is None or window >= seq_len):
        return None
    if torch.device(device).type == "cuda":
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

    def tie_weights(self) -> None:
        # Moving a module between devices (to_empty, FSDP) can leave two Parameters: tie them again.
        if self.args.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def set_kernels(self, kernels: KernelChoice) -> None:
        """Switches every op of the model at once: each module that runs an op holds the choice."""
        self.kernels = kernels
        for module in self.modules():
            if isinstance(module, (RMSNorm, Attention, MLP)):
                module.kernels = kernels

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        # Residual-branch outputs are scaled by 1/sqrt(2 * n_layers) (GPT-2 paper, section 2.3) so the
        # residual stream's variance does not grow with depth.
        out_std = std / math.sqrt(2 * self.args.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_out = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, 0.0, out_std if is_out else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

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
        if labels is None:
            return self.lm_head(hidden)
        if self.kernels.materialize_logits:
            logits = self.lm_head(hidden)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 logits upcast
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
        return ops.linear_cross_entropy(
            hidden,
            self.lm_head.weight,
            labels,
            ignore_index,
            reduction,
            bias=self.lm_head.bias,
            normalizer=normalizer,
            force=self.kernels.fused_ce,
        )
