"""Shape and switches of the decoder every family shares, and the named presets.

One flag-driven model (litgpt's choice, not torchtitan's model file per family): the families this
trainer takes are one pre-norm decoder with small differences, so each difference is a field here
and trainer/models/llama.py builds them all; trainer/models/families/ says, per family, which
fields its Hugging Face config sets.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

QK_NORMS = ("none", "head", "projection")
NORM_PLACEMENTS = ("pre", "post", "sandwich")
MLP_ACTIVATIONS = ("silu", "gelu_tanh")  # trainer.ops.Activation
NORM_CASTS = ("llama", "gemma")  # trainer.ops.NormCast
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 puts a bias on q, k and v
    head_dim: int | None = None  # default hidden_size // n_heads
    # Hugging Face's rope scaling parameters ({"rope_type": "llama3" | "linear", ...}); None: plain RoPE.
    rope_scaling: dict | None = None
    # Sliding-window attention (Mistral, Qwen2/3 with use_sliding_window): a query sees itself and
    # the sliding_window - 1 keys before it, in the layers `layer_types` marks "sliding_attention".
    sliding_window: int | None = None
    # "full_attention" / "sliding_attention" per layer; None: every layer sliding when sliding_window
    # is set, else every layer full.
    layer_types: tuple[str, ...] | None = None
    # q/k normalisation (RMSNorm, before RoPE): "head" over each head (Qwen3), "projection" over the
    # whole q and k projections (OLMo 2), "none".
    qk_norm: str = "none"
    # "pre": RMSNorm on the block's input before attention and MLP (Llama); "post": on their outputs,
    # before the residual add (OLMo 2); "sandwich": both, four norms a block (Gemma 2/3).
    norm_placement: str = "pre"
    # RMSNorm multiplies by (norm_offset + weight) (Gemma: 1), rounded as norm_cast says: "llama" casts
    # the normalised input to its dtype before the weight, "gemma" multiplies in fp32 and casts last.
    norm_offset: float = 0.0
    norm_cast: str = "llama"
    mlp_activation: str = "silu"  # the gate's: "silu" (SwiGLU) or "gelu_tanh" (Gemma's GeGLU)
    embed_scale: bool = False  # embeddings times sqrt(hidden_size), in their dtype (Gemma)
    # Attention scores scaled by query_pre_attn_scalar ** -0.5 instead of head_dim ** -0.5 (Gemma).
    query_pre_attn_scalar: float | None = None
    attn_softcap: float | None = None  # scores -> softcap * tanh(scores / softcap) (Gemma 2)
    final_softcap: float | None = None  # the same on the logits, in the loss too (Gemma 2)
    # The RoPE base of sliding-window layers when it differs from rope_theta (Gemma 3's local layers,
    # which take no rope scaling either).
    rope_local_theta: float | None = None
    # Rotary embedding on the first rotary_dim of each head's dimensions only (Phi-3's
    # partial_rotary_factor); None: the whole head.
    rotary_dim: int | None = None
    # q, k and v as one qkv_proj and gate and up as one gate_up_proj (Phi-3): its checkpoints' layout
    # and PEFT's target names; one matmul each instead of three and two.
    fused_projections: bool = False
    # The embedding row of the checkpoint's pad_token_id, which (as in transformers' nn.Embedding with
    # padding_idx) gets no gradient; None: every row trains.
    padding_idx: int | None = None
    # Mixture of experts (Mixtral, Qwen3-MoE; trainer/models/moe.py): n_experts > 0 replaces the MLP of
    # every layer not in dense_layers by experts_per_token of n_experts SwiGLU experts, each of width
    # moe_intermediate_size (default intermediate_size, which the dense layers keep).
    n_experts: int = 0
    experts_per_token: int = 2
    moe_intermediate_size: int | None = None
    dense_layers: tuple[int, ...] = ()
    moe_norm_topk: bool = True  # the top-k router probabilities renormalised to sum to 1
    router_round_weights: bool = False  # and rounded to the router logits' dtype (Qwen3-MoE)
    # The load-balancing loss's weight in the training loss (the checkpoint's router_aux_loss_coef).
    router_aux_loss_coef: float = 0.0
    # The registry name of the family (trainer/models/families): the Hugging Face class the model
    # loads from and saves to.
    family: str = "llama"

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.n_heads
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")
        for name, allowed in (
            ("norm_placement", NORM_PLACEMENTS),
            ("mlp_activation", MLP_ACTIVATIONS),
            ("norm_cast", NORM_CASTS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.layer_types is not None:
            self.layer_types = tuple(self.layer_types)
            if len(self.layer_types) != self.n_layers or set(self.layer_types) - set(LAYER_TYPES):
                raise ValueError(f"layer_types must name one of {LAYER_TYPES} for each of the {self.n_layers} layers")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")
        self.dense_layers = tuple(self.dense_layers)
        if self.n_experts and not 0 < self.experts_per_token <= self.n_experts:
            raise ValueError(
                f"experts_per_token must be in 1..n_experts ({self.n_experts}), got {self.experts_per_token}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if (self.rotary_dim or self.head_dim) % 2 or (self.rotary_dim or 0) > self.head_dim:
            raise ValueError(
                f"the rotary part of a head ({self.rotary_dim or self.head_dim}) must be even and <= head_dim"
            )

    @property
    def expert_intermediate_size(self) -> int:
        return self.moe_intermediate_size or self.intermediate_size

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_experts > 0 and layer not in self.dense_layers

    def seq_len_problem(self, seq_len: int) -> str | None:
        """Why a sequence of `seq_len` tokens cannot run on this model ("is longer than ..."), or None.
        The one place that knows the limits: the model's forward, build_run and the planner ask it."""
        if seq_len > self.max_seq_len:
            return f"is longer than the model allows (max_seq_len {self.max_seq_len})"
        return None

    def window_of(self, layer: int) -> int | None:
        """The sliding window of layer `layer`, None for full attention."""
        if self.layer_types is None:
            return self.sliding_window
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def num_params(self, include_embedding: bool = True) -> int:
        h, kv = self.hidden_size, self.n_kv_heads * self.head_dim
        q = self.n_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.qkv_bias else 0)
        attn += {"none": 0, "head": 2 * self.head_dim, "projection": q + kv}[self.qk_norm]
        dense = 3 * h * self.intermediate_size
        moe = self.n_experts * (3 * h * self.expert_intermediate_size + h)  # experts and router
        norms = {"pre": 2, "post": 2, "sandwich": 4}[self.norm_placement] * h
        emb = self.vocab_size * h
        total = sum(attn + norms + (moe if self.is_moe_layer(i) else dense) for i in range(self.n_layers))
        total += h + (emb if self.tie_embeddings else 2 * emb)
        return total if include_embedding else total - emb


# vocab_size None: taken from the tokenizer. The Llama shapes follow the published configs:
# Llama 3.2 1B, Llama 2 7B and Llama 3 8B (Meta's config.json files on the Hugging Face hub).
PRESETS: dict[str, dict] = {
    "tiny": dict(
        vocab_size=None,
        hidden_size=128,
        intermediate_size=352,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=512,
        tie_embeddings=True,
    ),
    "small": dict(
        vocab_size=None,
        hidden_size=256,
        intermediate_size=688,
        n_layers=4,
        n_heads=8,
        n_kv_heads=4,
        max_seq_len=1024,
        tie_embeddings=True,
    ),
    "llama-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        head_dim=64,
        max_seq_len=131072,
        rope_theta=500000.0,
        tie_embeddings=True,
    ),
    "llama-7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        n_layers=32,
        n_heads=32,
        n_kv_heads=32,
        max_seq_len=4096,
        rope_theta=10000.0,
    ),
    "llama-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        max_seq_len=8192,
        rope_theta=500000.0,
    ),
}


def pad_vocab(n: int, multiple: int = 64) -> int:
    # Matmuls over a vocabulary that is a multiple of 64 run faster (nanoGPT pads 50257 to 50304).
    return -(-n // multiple) * multiple


def resolve_args(preset: str, tokenizer_vocab: int | None = None, **overrides) -> ModelArgs:
    """ModelArgs of a preset, with `overrides` (None values ignored) and the tokenizer's vocab."""
    if preset not in PRESETS:
        raise KeyError(preset)
    values = dict(PRESETS[preset])
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values["vocab_size"] is None:
        if tokenizer_vocab is None:
            raise ValueError(f"preset {preset!r} takes its vocab_size from the tokenizer; none was given")
        values["vocab_size"] = pad_vocab(tokenizer_vocab)
    if values.get("qkv_bias"):  # biases on q, k and v (not o) are Qwen2's: the family that saves them
        values["family"] = "qwen2"
    if "head_dim" not in overrides or overrides.get("head_dim") is None:
        if "hidden_size" in overrides and overrides["hidden_size"] is not None:
            values.pop("head_dim", None)  # a new width keeps hidden_size // n_heads
    return ModelArgs(**values)
