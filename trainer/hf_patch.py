"""patch_hf: our RMSNorm, RoPE, SwiGLU and fused linear cross-entropy inside a transformers model.

For users who keep Hugging Face's Trainer: `patch_hf(model)` replaces the `forward` of the model's
own norm, MLP and attention modules, and of the causal-LM head, on that one instance. Nothing in
transformers is changed globally, so other models in the process keep their stock code.

With labels, the patched causal LM computes the loss from the hidden states without materialising
the logits (the point of the fused loss) and returns logits=None; without labels it runs unchanged.
The attention forward mirrors transformers 5's attention of the families in
trainer/models/families (q/k norms included) with ops.rope in place of apply_rotary_pos_emb, and
keeps whichever attention backend the model was loaded with.
"""

from __future__ import annotations

import sys
from functools import partial
from types import MethodType

import torch
import torch.nn.functional as F

from trainer import ops
from trainer.constants import IGNORE_INDEX
from trainer.errors import CheckpointError, ConfigError
from trainer.models.families import FAMILIES
from trainer.models.hf import args_from_hf_config

SUPPORTED_MODELS = tuple(family.architecture for family in FAMILIES)


def patch_hf(model, *, rms_norm: bool = True, rope: bool = True, swiglu: bool = True, fused_loss: bool = True):
    """Swaps our ops into a transformers causal LM of a family we know, in place; returns the model."""
    name = type(model).__name__
    if name not in SUPPORTED_MODELS:
        raise ConfigError(f"patch_hf supports {', '.join(SUPPORTED_MODELS)}, not {name}")
    try:  # the family's switches (norm offset and rounding, MLP activation), as our own model reads them
        args = args_from_hf_config({**model.config.to_dict(), "architectures": [name]})
    except CheckpointError as e:
        raise ConfigError(f"patch_hf: {e}") from None
    prefix = name.removesuffix("ForCausalLM")  # Gemma3ForCausalLM's modules are Gemma3TextAttention, ...
    replacements = {
        "RMSNorm": (rms_norm, partial(_rms_norm_forward, args)),
        "MLP": (swiglu, partial(_gated_mlp_forward, args)),
        "Attention": (rope, _attention_forward),
    }
    for module in model.modules():
        kind = type(module).__name__.removeprefix(prefix).removeprefix("Text")
        enabled, forward = replacements.get(kind, (False, None))
        if enabled:
            module.forward = MethodType(forward, module)
    if fused_loss:
        model.forward = MethodType(_causal_lm_forward, model)
    return model


# The two below take the family's ModelArgs first (functools.partial), then the module (MethodType).


def _rms_norm_forward(args, self, hidden_states):
    eps = getattr(self, "variance_epsilon", getattr(self, "eps", None))  # Gemma's modules name it eps
    return ops.rms_norm(hidden_states, self.weight, eps, offset=args.norm_offset, cast=args.norm_cast)


def _gated_mlp_forward(args, self, x):
    if hasattr(self, "gate_up_proj"):  # Phi-3's fused projection: gate first
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
    else:
        gate, up = self.gate_proj(x), self.up_proj(x)
    return self.down_proj(ops.gated_activation(gate, up, args.mlp_activation))


def _attention_forward(
    self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs
):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    if hasattr(self, "qkv_proj"):  # Phi-3's fused projection: q, then k, then v
        q_width = self.config.num_attention_heads * self.head_dim
        k_width = self.config.num_key_value_heads * self.head_dim
        query, key, value = self.qkv_proj(hidden_states).split((q_width, k_width, k_width), dim=-1)
    else:
        query, key, value = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
    # q/k norms: over the whole projection (OLMo 2) before the heads are split, or over each head (Qwen3).
    q_norm, k_norm = getattr(self, "q_norm", None), getattr(self, "k_norm", None)
    per_head = q_norm is not None and q_norm.weight.shape[-1] == self.head_dim
    if q_norm is not None and not per_head:
        query, key = q_norm(query), k_norm(key)
    query, key = query.view(hidden_shape), key.view(hidden_shape)
    if per_head:
        query, key = q_norm(query), k_norm(key)
    query, key = query.transpose(1, 2), key.transpose(1, 2)
    value = value.view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    rotary = cos.shape[-1]  # Phi-3 turns only the first part of each head
    if rotary == self.head_dim:
        query, key = ops.rope(query, key, cos, sin)
    else:
        q_rot, k_rot = ops.rope(query[..., :rotary], key[..., :rotary], cos, sin)
        query = torch.cat((q_rot, query[..., rotary:]), dim=-1)
        key = torch.cat((k_rot, key[..., rotary:]), dim=-1)
    if past_key_values is not None:
        key, value = past_key_values.update(key, value, self.layer_idx)
    # The eager fallback lives in the model's own modeling file.
    eager = sys.modules[type(self).__module__].eager_attention_forward
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager)
    # Qwen2 sets a window per layer, Mistral in its config; Llama has none.
    sliding_window = getattr(self, "sliding_window", getattr(self.config, "sliding_window", None))
    out, weights = attention(
        self,
        query,
        key,
        value,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        sliding_window=sliding_window,
        softcap=getattr(self, "attn_logit_softcapping", None),  # Gemma 2
        **kwargs,
    )
    return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def _causal_lm_forward(
    self,
    input_ids=None,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    inputs_embeds=None,
    labels=None,
    use_cache=None,
    logits_to_keep=0,
    **kwargs,
):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    if labels is None:  # inference: the stock forward, logits and all
        return type(self).forward(
            self,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
    # HF Trainer passes the token count of the whole accumulated batch; the loss is then the sum over
    # this micro-batch divided by it, as transformers' own ForCausalLMLoss does.
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    outputs = self.model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        inputs_embeds=inputs_embeds,
        use_cache=use_cache,
        **kwargs,
    )
    if shift_labels is None:  # the model shifts: position t predicts label t + 1
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    loss = ops.linear_cross_entropy(
        outputs.last_hidden_state,
        self.lm_head.weight,
        shift_labels.to(labels.device),
        IGNORE_INDEX,
        "mean",
        bias=self.lm_head.bias,
        normalizer=num_items_in_batch,
        softcap=getattr(self.config, "final_logit_softcapping", None),  # Gemma 2
    )
    return CausalLMOutputWithPast(
        loss=loss,
        logits=None,
        past_key_values=outputs.past_key_values,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
    )
