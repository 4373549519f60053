"""NEFTune (train.neftune_alpha): the noise's scale, training passes only, and Hugging Face Trainer's hook
as the reference."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import tiny_config
from trainer.errors import ConfigError
from trainer.models import build, save_hf
from trainer.models.config import ModelArgs

ARGS = ModelArgs(
    vocab_size=97, hidden_size=48, intermediate_size=80, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64
)


def tokens(n, t, seed=1):
    return torch.randint(0, ARGS.vocab_size, (n, t), generator=torch.Generator().manual_seed(seed))


def embeddings_seen_by_the_first_block(model, ids):
    seen = {}

    def keep(module, args):
        seen["x"] = args[0]

    handle = model.model.layers[0].register_forward_pre_hook(keep)
    with torch.no_grad():
        model(ids)
    handle.remove()
    return seen["x"]


@pytest.mark.parametrize("seq_len", [40, 17])
def test_noise_is_uniform_with_magnitude_alpha_over_sqrt_seq_len_times_hidden(seq_len):
    model = build(ARGS, seed=0).train()
    model.model.neftune_alpha = 5.0
    ids = tokens(4, seq_len)
    noise = embeddings_seen_by_the_first_block(model, ids) - model.model.embed_tokens(ids).detach()
    magnitude = 5.0 / (seq_len * ARGS.hidden_size) ** 0.5
    assert noise.abs().max() <= magnitude * (1 + 1e-6)
    assert noise.abs().max() > 0.99 * magnitude  # thousands of draws reach the edge
    # |U(-m, m)| has mean m / 2; with >= 3264 draws its standard error is under 1% of that.
    assert abs(noise.abs().mean().item() / (magnitude / 2) - 1) < 0.04
    assert abs(noise.mean().item()) < 0.05 * magnitude


def test_evaluation_and_alpha_zero_are_unchanged():
    model = build(ARGS, seed=0)
    ids = tokens(2, 23)
    with torch.no_grad():
        clean = model.eval()(ids)
        model.model.neftune_alpha = 5.0
        assert torch.equal(model(ids), clean)  # eval: no noise with it on
        model.model.neftune_alpha = 0.0
        assert torch.equal(model.train()(ids), clean)  # off: training passes are clean too
        model.model.neftune_alpha = 5.0
        assert not torch.equal(model(ids), clean)


def test_training_forward_equals_hugging_face_trainers_neftune_hook(tmp_path):
    transformers = pytest.importorskip("transformers")
    from transformers.integrations.neftune import neftune_post_forward_hook

    ours = build(ARGS, seed=0)
    save_hf(ours, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").train()
    embedding = hf.get_input_embeddings()
    embedding.neftune_noise_alpha = 5.0
    embedding.register_forward_hook(neftune_post_forward_hook)
    ours.train().model.neftune_alpha = 5.0
    ids = tokens(2, 23)
    with torch.no_grad():
        torch.manual_seed(7)
        theirs = hf(ids).logits
        torch.manual_seed(7)  # the same draws: same noise up to fp32 rounding of its bound
        mine = ours(ids)
        torch.manual_seed(8)
        other_draw = ours(ids)
    assert ((mine - theirs).norm() / theirs.norm()).item() < 1e-5
    assert ((other_draw - theirs).norm() / theirs.norm()).item() > 1e-4  # the noise is visible at this size


def test_negative_alpha_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.neftune_alpha must be >= 0, got -1.0"):
        tiny_config(tmp_path, train__neftune_alpha=-1)
