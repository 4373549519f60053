"""Shape of a Llama-family decoder, and the named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


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
    # Mistral's sliding-window attention span; sequences longer than it are refused (within it, the
    # window changes nothing).
    sliding_window: int | None = None
    # The Hugging Face class a checkpoint came from, written back by save_hf; None: LlamaForCausalLM,
    # or Qwen2ForCausalLM when qkv_bias.
    hf_architecture: str | None = None

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")

    def seq_len_problem(self, seq_len: int) -> str | None:
        """Why a sequence of `seq_len` tokens cannot run on this model ("is longer than ..."), or None.
        The one place that knows the limits: the model's forward, build_run and the planner ask it."""
        if seq_len > self.max_seq_len:
            return f"is longer than the model allows (max_seq_len {self.max_seq_len})"
        if self.sliding_window is not None and seq_len > self.sliding_window:
            return (
                f"is longer than the model's sliding window ({self.sliding_window}), which this trainer does "
                "not implement"
            )
        return None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def num_params(self, include_embedding: bool = True) -> int:
        h, kv = self.hidden_size, self.n_kv_heads * self.head_dim
        q = self.n_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.qkv_bias else 0)
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h
        emb = self.vocab_size * h
        total = self.n_layers * per_layer + h + (emb if self.tie_embeddings else 2 * emb)
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
    if "head_dim" not in overrides or overrides.get("head_dim") is None:
        if "hidden_size" in overrides and overrides["hidden_size"] is not None:
            values.pop("head_dim", None)  # a new width keeps hidden_size // n_heads
    return ModelArgs(**values)
