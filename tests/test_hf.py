"""Hugging Face interop: checkpoints of each family, SFT data, document masking, patching, generation."""

from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from trainer.errors import CheckpointError  # noqa: E402
from trainer.models import load_hf, save_hf  # noqa: E402
from trainer.models.families import BY_NAME  # noqa: E402

SHAPE = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
)
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": 32}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 8}),
    "olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM, {}),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, {"pad_token_id": 0, "eos_token_id": 2}),
    # Small softcaps, a scalar other than head_dim and a window shorter than tokens(): each one shows.
    "gemma2": (
        transformers.Gemma2Config,
        transformers.Gemma2ForCausalLM,
        {
            "head_dim": 8,
            "query_pre_attn_scalar": 16,
            "sliding_window": 7,
            "attn_logit_softcapping": 2.0,
            "final_logit_softcapping": 3.0,
        },
    ),
    "gemma3": (
        transformers.Gemma3TextConfig,
        transformers.Gemma3ForCausalLM,
        {
            "head_dim": 8,
            "query_pre_attn_scalar": 16,
            "sliding_window": 7,
            "layer_types": ["sliding_attention", "full_attention"],
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        },
    ),
    # Five experts, top-2; Qwen3-MoE with a dense layer and without renormalised top-k weights.
    "mixtral": (
        transformers.MixtralConfig,
        transformers.MixtralForCausalLM,
        {"num_local_experts": 5, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.02},
    ),
    "qwen3_moe": (
        transformers.Qwen3MoeConfig,
        transformers.Qwen3MoeForCausalLM,
        {
            "num_experts": 5,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 24,
            "head_dim": 8,
            "mlp_only_layers": [1],
            "norm_topk_prob": False,
            "router_aux_loss_coef": 0.02,
        },
    ),
}


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def hf_model(family="llama", seed=0, dtype=torch.float32, **changes):
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**SHAPE, **extra, **changes})).eval()
    with torch.no_grad():  # norms start at 1: perturb them so a swapped or missing weight shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
            if ".experts." in name or name.endswith("mlp.gate.weight"):  # some start at zero; routing should vary
                p.normal_(0.0, 0.2)
    return model.to(dtype)


def hf_folder(tmp_path, family="llama", name="hf", max_shard_size=None, **kwargs):
    model = hf_model(family, **kwargs)
    folder = tmp_path / name
    model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return model, folder


def tokens(n=2, t=23, seed=1):
    return torch.randint(0, SHAPE["vocab_size"], (n, t), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def assert_same_logits(ours, hf, x=None, tol=1e-5):
    """Logits of two models (ours or transformers') agree within `tol` relative error."""
    x = tokens() if x is None else x
    with torch.no_grad():
        assert rel(logits(ours, x), logits(hf, x)) <= tol


# ----------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("family", list(FAMILIES))
def test_against_hf(tmp_path, family):
    hf, folder = hf_folder(tmp_path, family)
    ours = load_hf(folder)
    assert BY_NAME[ours.args.family].architecture == type(hf).__name__
    assert_same_logits(ours, hf)


def test_against_hf_llama_rope_scaling_llama3(tmp_path):
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    hf, folder = hf_folder(tmp_path, rope_scaling=scaling, rope_theta=500.0, head_dim=16)
    ours = load_hf(folder)
    assert ours.args.rope_scaling["rope_type"] == "llama3"
    assert_same_logits(ours, hf, tokens(t=60))
    # Without the scaling the model differs: the test would notice it being dropped.
    plain = load_hf(folder)
    plain.args.rope_scaling = None
    plain.model.rotary_emb.reset_parameters()
    with torch.no_grad():
        assert rel(plain(tokens(t=60)), hf(tokens(t=60)).logits) > 1e-3
    save_hf(ours, tmp_path / "again")  # what we write keeps the scaling for transformers
    assert_same_logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again"), hf, tokens(t=60))


def test_against_hf_phi3_partial_rotary(tmp_path):
    hf, folder = hf_folder(tmp_path, "phi3", partial_rotary_factor=0.5)
    ours = load_hf(folder)
    assert ours.args.rotary_dim == 4 and ours.args.fused_projections
    assert_same_logits(ours, hf)
    save_hf(ours, tmp_path / "again")
    assert_same_logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again"), hf)


@pytest.mark.parametrize(
    "switch, off",
    [
        ("attn_softcap", None),
        ("final_softcap", None),
        ("query_pre_attn_scalar", None),
        ("embed_scale", False),
        ("norm_offset", 0.0),
        ("layer_types", None),  # every layer sliding
        ("rope_local_theta", None),  # gemma3: the local layers' own RoPE base
        ("qk_norm", "none"),  # gemma3
    ],
)
def test_against_hf_gemma_every_switch_matters(tmp_path, switch, off):
    """With caps small enough to bend these random models' scores and logits, our Gemma matches
    transformers', and the same weights with one switch turned off do not."""
    family = "gemma3" if switch in ("rope_local_theta", "qk_norm") else "gemma2"
    changes = {"attn_logit_softcapping": 0.01, "final_logit_softcapping": 0.05} if family == "gemma2" else {}
    hf, folder = hf_folder(tmp_path, family, **changes)
    x = tokens(t=23)
    ours = load_hf(folder)
    assert_same_logits(ours, hf, x)
    changed = load_hf(folder)
    setattr(changed.args, switch, off)
    if switch == "qk_norm":  # the modules read it at construction
        for layer in changed.model.layers:
            layer.self_attn.qk_norm = "none"
    if switch == "norm_offset":
        for module in changed.modules():
            if hasattr(module, "offset"):
                module.offset = off
    if switch == "query_pre_attn_scalar":
        for layer in changed.model.layers:
            layer.self_attn.scale = None
    if switch == "attn_softcap":
        for layer in changed.model.layers:
            layer.self_attn.softcap = None
    if switch == "rope_local_theta":
        changed.model.rotary_emb_local = changed.model.rotary_emb
    with torch.no_grad():
        assert rel(changed(x), hf(x).logits) > 1e-4


def test_sharded_checkpoint_loads(tmp_path):
    hf, folder = hf_folder(tmp_path, "qwen2", max_shard_size="20KB")
    assert len(list(folder.glob("model-*.safetensors"))) > 1 and (folder / "model.safetensors.index.json").exists()
    assert_same_logits(load_hf(folder), hf)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_through_transformers(tmp_path, family):
    hf, folder = hf_folder(tmp_path, family)
    ours = load_hf(folder)
    save_hf(ours, tmp_path / "single")
    save_hf(ours, tmp_path / "sharded", max_shard_bytes=20_000)
    assert len(json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    for name in ("single", "sharded"):
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()
        assert type(back) is type(hf)
        assert_same_logits(ours, back)
        assert_same_logits(load_hf(tmp_path / name), hf)
    saved = json.loads((tmp_path / "single" / "config.json").read_text())
    assert saved["eos_token_id"] == hf.config.eos_token_id  # keys of the source config are kept


def test_bf16_checkpoint_loads_as_bf16(tmp_path):
    hf, folder = hf_folder(tmp_path, dtype=torch.bfloat16)
    ours = load_hf(folder)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert ours.model.rotary_emb.inv_freq.dtype == torch.float32
    assert_same_logits(ours, hf, tol=2e-2)
    save_hf(ours, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert back.dtype == torch.bfloat16


def test_loading_holds_the_weights_once(tmp_path, monkeypatch):
    """Every parameter is the very tensor read from the file: no second, model-sized buffer is made."""
    import trainer.models.hf as hf_module

    _, folder = hf_folder(tmp_path, max_shard_size="20KB")
    read = set()
    real_safe_open = hf_module.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self.file = real_safe_open(*args, **kwargs)

        def __enter__(self):
            self.handle = self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def keys(self):
            return self.handle.keys()

        def get_tensor(self, name):
            tensor = self.handle.get_tensor(name)
            read.add(tensor.data_ptr())
            return tensor

    monkeypatch.setattr(hf_module, "safe_open", Recording)
    model = load_hf(folder)
    assert {p.data_ptr() for p in model.parameters()} <= read


def test_unsupported_architecture_is_refused(tmp_path):
    _, folder = hf_folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError,
        match="'GPT2LMHeadModel' is not supported; supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM",
    ):
        load_hf(folder)


def test_unsupported_rope_scaling_is_refused(tmp_path):
    _, folder = hf_folder(tmp_path, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(CheckpointError, match="rope scaling type 'yarn' is not supported"):
        load_hf(folder)


@pytest.mark.parametrize(
    "family, window_config",
    [
        ("mistral", {"sliding_window": 7}),  # every layer
        ("qwen2", {"use_sliding_window": True, "sliding_window": 7, "max_window_layers": 1}),  # layer 1 only
        ("qwen3", {"use_sliding_window": True, "sliding_window": 7, "max_window_layers": 1}),
        ("phi3", {"sliding_window": 7}),
    ],
)
def test_against_hf_sliding_window_beyond_the_window(tmp_path, family, window_config):
    hf, folder = hf_folder(tmp_path, family, **window_config)
    ours = load_hf(folder)
    assert ours.args.sliding_window == 7
    x = tokens(t=40)
    assert_same_logits(ours, hf, x)
    # The window matters at this length: the same weights with full attention give other logits.
    full = load_hf(folder)
    full.args.sliding_window, full.args.layer_types = None, None
    with torch.no_grad():
        assert rel(full(x), hf(x).logits) > 1e-3
    save_hf(ours, tmp_path / "again")  # and what we write keeps the window for transformers
    assert_same_logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again"), hf, x)


# ----------------------------------------------------------------------- tokenizer folders and SFT data

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = "the cat sat on a mat and dog ran to red blue hat what is color say hello world yes no".split()


def tokenizer_folder(folder, chat_template=CHAT_TEMPLATE):
    """A small word-level BPE with <s>/</s> and chat tokens, BOS added by its post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.BPEDecoder()
    texts = [" ".join(WORDS[i:] + WORDS[:i]) + " user assistant system : ? ." for i in range(len(WORDS))]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=90, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", **({"chat_template": chat_template} if chat_template else {})}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_sft_prompt_tokens_get_ignored_labels(tmp_path):
    from trainer.data import load_tokenizer
    from trainer.data.sft import PackedExamples, encode_example

    tok = load_tokenizer(str(tokenizer_folder(tmp_path / "tok")))
    example = encode_example({"prompt": "what is the color ?", "completion": "red hat"}, tok, "test")
    prompt, completion = tok.encode("what is the color ?"), tok.encode("red hat")
    bos = tok._tok.token_to_id("<s>")
    assert example.tokens.tolist() == [bos] + prompt + completion + [tok.eos_id]
    assert example.targets.tolist() == [False] * (1 + len(prompt)) + [True] * (len(completion) + 1)

    other = encode_example({"prompt": "say hello", "completion": "hello world"}, tok, "test")
    packed = PackedExamples([example, other], seq_len=31, pad_id=tok.eos_id)
    assert packed.n_blocks == 1
    batch = packed.batch([0])
    first, second = len(example.tokens), len(other.tokens)
    row = torch.cat([torch.from_numpy(example.tokens), torch.from_numpy(other.tokens)])
    assert torch.equal(batch["input_ids"][0, : first + second], row[: first + second])
    trained = torch.cat([torch.from_numpy(example.targets), torch.from_numpy(other.targets)])[1:]
    expected = torch.where(trained, row[1:], torch.tensor(-100))
    assert torch.equal(batch["labels"][0, : first + second - 1], expected)
    assert (batch["labels"][0, first + second - 1 :] == -100).all()  # padding is never trained
    assert batch["position_ids"][0, : first + second].tolist() == list(range(first)) + list(range(second))
    assert batch["document_ids"][0, : first + second].tolist() == [0] * first + [1] * second


def test_sft_messages_train_only_the_assistant_turns(tmp_path):
    from trainer.data import load_tokenizer
    from trainer.data.sft import encode_example, render_chat

    tok = load_tokenizer(str(tokenizer_folder(tmp_path / "tok")))
    messages = [
        {"role": "system", "content": "say yes"},
        {"role": "user", "content": "what is red ?"},
        {"role": "assistant", "content": "a color"},
        {"role": "user", "content": "and blue ?"},
        {"role": "assistant", "content": "a color too"},
    ]
    example = encode_example({"messages": messages}, tok, "test")
    assert tok.decode(example.tokens) == tok.decode(tok.encode_markup(render_chat(CHAT_TEMPLATE, messages, tok, False)))
    trained = example.tokens[example.targets].tolist()
    assert trained == tok.encode_markup("a color<|im_end|>\n") + tok.encode_markup("a color too<|im_end|>\n")

    plain = load_tokenizer(str(tokenizer_folder(tmp_path / "plain", chat_template=None)))
    from trainer.data import DataError

    with pytest.raises(DataError, match="'messages' needs a chat template"):
        encode_example({"messages": messages}, plain, "data.jsonl:1")


def write_sft_jsonl(path, n=40):
    import random

    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            prompt, completion = " ".join(rng.choices(WORDS, k=5)), " ".join(rng.choices(WORDS, k=4))
            if i % 2:
                line = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]}
            else:
                line = {"prompt": prompt, "completion": completion}
            f.write(json.dumps(line) + "\n")
    return path


def test_sft_loader_resumes_exactly(tmp_path):
    from trainer.data import BlockLoader, load_tokenizer
    from trainer.data.sft import prepare_sft

    tok = load_tokenizer(str(tokenizer_folder(tmp_path / "tok")))
    data = prepare_sft(str(write_sft_jsonl(tmp_path / "sft.jsonl")), tok, seq_len=32, val_fraction=0.1)
    assert data.val is not None and data.train.n_blocks >= 4
    loader = BlockLoader(data.train, 32, 2, 1, seed=3)
    loader.next_step()
    state = loader.state_dict()
    expected = [loader.next_step() for _ in range(3)]
    resumed = BlockLoader(data.train, 32, 2, 1, seed=3)
    resumed.load_state_dict(state)
    for want, got in zip(expected, [resumed.next_step() for _ in range(3)]):
        assert all(torch.equal(want[0][k], got[0][k]) for k in want[0])


def test_sft_data_counts_examples_cut_dropped_and_rows_not_tokens(tmp_path):
    from trainer.data import load_tokenizer
    from trainer.data.sft import prepare_sft

    tok = load_tokenizer(str(tokenizer_folder(tmp_path / "tok")))
    path = write_sft_jsonl(tmp_path / "sft.jsonl", n=30)
    with open(path, "a") as f:
        # 3 whose completion is cut but not lost, 2 whose prompt alone fills a row of 33 tokens.
        for _ in range(3):
            f.write(json.dumps({"prompt": "say hello", "completion": " ".join(["red"] * 60)}) + "\n")
        for _ in range(2):
            f.write(json.dumps({"prompt": " ".join(["blue"] * 60), "completion": "yes"}) + "\n")
    data = prepare_sft(str(path), tok, seq_len=32, val_fraction=0.0)
    assert (data.n_examples, data.n_cut, data.n_dropped, data.n_train, data.n_val) == (35, 5, 2, 33, 0)
    assert data.train.n_blocks < 33 < len(data.train)  # packed: fewer rows than examples, more tokens
    assert data.describe() == (
        f"35 examples read, 5 cut to train.seq_len, 2 dropped (no completion left); 33 training examples "
        f"packed into {data.train.n_blocks} training rows of 33 tokens"
    )


# ----------------------------------------------------------------------- document masking


def test_document_mask_equals_running_each_example_alone():
    """Packed SFT rows: logits and gradients equal those of each example run on its own."""
    from trainer.data.sft import Example, PackedExamples
    from trainer.models import ModelArgs, build

    torch.manual_seed(0)
    model = build(
        ModelArgs(
            vocab_size=97, hidden_size=32, intermediate_size=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64
        )
    ).double()
    rng = torch.Generator().manual_seed(0)
    examples = []
    for length in (9, 6, 12):
        ids = torch.randint(1, 97, (length,), generator=rng).numpy()
        targets = torch.rand(length, generator=rng).numpy() > 0.3
        targets[0] = False
        examples.append(Example(ids, targets))
    packed = PackedExamples(examples, seq_len=31, pad_id=0)
    assert packed.n_blocks == 1
    batch = packed.batch([0])
    assert batch["labels"].ne(-100).sum() == sum(int(e.targets.sum()) for e in examples)

    loss = model(
        batch["input_ids"],
        labels=batch["labels"],
        position_ids=batch["position_ids"],
        document_ids=batch["document_ids"],
        reduction="sum",
    )
    loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    packed_logits = model(batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch["document_ids"])
    model.zero_grad()

    alone_loss, alone_logits = 0.0, []
    for e in examples:
        ids = torch.from_numpy(e.tokens)[None]
        labels = torch.where(torch.from_numpy(e.targets), torch.from_numpy(e.tokens), -100)[None, 1:]
        loss_one = model(ids[:, :-1], labels=labels, reduction="sum")
        loss_one.backward()
        alone_loss += loss_one.item()
        alone_logits.append(model(ids))
    assert abs(loss.item() - alone_loss) < 1e-9 * abs(alone_loss)
    total = sum(len(e.tokens) for e in examples)
    assert rel(packed_logits[:, :total], torch.cat(alone_logits, dim=1)) < 1e-12
    for name, p in model.named_parameters():
        assert rel(packed_grads[name], p.grad) < 1e-10, name


# ----------------------------------------------------------------------- patch_hf


@pytest.mark.parametrize("family", list(FAMILIES))
def test_patch_hf_keeps_losses_and_gradients(family):
    from trainer import patch_hf

    x = tokens(2, 20)
    labels = x.clone()
    labels[0, :6] = -100
    results = []
    for patched in (False, True):
        model = hf_model(family, seed=4).train()
        if patched:
            assert patch_hf(model) is model
        out = model(x, labels=labels)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
        if patched:
            assert out.logits is None  # the fused loss never builds them
            with torch.no_grad():
                assert rel(model(x).logits, hf_model(family, seed=4)(x).logits) < 1e-5
    (loss, grads), (patched_loss, patched_grads) = results
    assert rel(patched_loss, loss) < 1e-5
    for name in grads:
        assert rel(patched_grads[name], grads[name]) < 1e-4, name
    # HF Trainer's accumulation: the summed loss divided by the count of the whole batch.
    model = hf_model(family, seed=4)
    patch_hf(model)
    with torch.no_grad():
        assert (
            rel(
                model(x, labels=labels, num_items_in_batch=100).loss,
                hf_model(family, seed=4)(x, labels=labels, num_items_in_batch=100).loss,
            )
            < 1e-5
        )


def test_patch_hf_refuses_other_models():
    from trainer import patch_hf
    from trainer.errors import ConfigError

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(
        ConfigError,
        match="patch_hf supports LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, "
        "Phi3ForCausalLM, Olmo2ForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM, MixtralForCausalLM, "
        "Qwen3MoeForCausalLM, not GPT2LMHeadModel",
    ):
        patch_hf(gpt2)


# ----------------------------------------------------------------------- fine-tuning and generation


def model_folder(tmp_path, family="llama", name="model"):
    """A random transformers model saved with a tokenizer.json: what a downloaded checkpoint looks like."""
    hf, folder = hf_folder(tmp_path, family, name=name)
    tokenizer_folder(folder)
    return hf, folder


def test_generate_greedy_equals_argmax_decoding_with_transformers(tmp_path, capsys):
    from trainer.cli import main
    from trainer.data import load_tokenizer

    hf, folder = model_folder(tmp_path)
    tok = load_tokenizer(str(folder))
    ids = torch.tensor([tok.encode_markup("the cat sat", add_special_tokens=True)])
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, hf(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    by_hand = ids[0, -6:].tolist()
    if tok.eos_id in by_hand:  # generation stops at EOS and leaves it out
        by_hand = by_hand[: by_hand.index(tok.eos_id)]
    assert len(by_hand) >= 2
    assert main(["generate", str(folder), "--prompt", "the cat sat", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == tok.decode(by_hand) + "\n"

    sampled = []
    for _ in range(2):
        main(["generate", str(folder), "--prompt", "the cat", "--temperature", "1.5", "--top-p", "0.9", "--seed", "7"])
        sampled.append(capsys.readouterr().out)
    assert sampled[0] == sampled[1]  # a seed fixes the sample
    assert main(["generate", str(folder), "--prompt", "x", "--top-p", "2"]) == 2
    assert "--top-p in (0, 1]" in capsys.readouterr().err


def test_fine_tune_from_hf_checkpoint_end_to_end(tmp_path, capsys):
    from trainer import Trainer
    from trainer.cli import main
    from trainer.config import load_config
    from trainer.metrics import read_metrics

    _, folder = model_folder(tmp_path, "qwen2")
    data = write_sft_jsonl(tmp_path / "sft.jsonl")
    out = tmp_path / "run"
    cfg = load_config(
        None,
        {
            "model.from_hf": str(folder),
            "data.path": str(data),
            "data.format": "sft",
            "data.val_fraction": 0.1,
            "train.output_dir": str(out),
            "train.max_steps": 3,
            "train.micro_batch_size": 2,
            "train.seq_len": 32,
            "train.dtype": "fp32",
            "train.device": "cpu",
            "train.progress": "none",
            "train.eval_batches": 1,
            "optim.warmup_steps": 1,
            "optim.lr": 1e-3,
            "checkpoint.save_every": 2,
        },
    )
    state = Trainer(cfg).train()
    assert state.step == 3
    steps = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(steps) == 3 and all(r["loss"] is not None and r["loss"] > 0 for r in steps)
    final = out / "final"
    assert json.loads((final / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    assert load_hf(final).args.family == "qwen2"
    capsys.readouterr()
    for checkpoint in (final, out / "checkpoint-2"):
        assert main(["generate", str(checkpoint), "--prompt", "what is", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.count("\n") == 2


def test_packed_sft_rows_train_beyond_the_sliding_window(tmp_path):
    from trainer import Trainer
    from trainer.config import load_config
    from trainer.metrics import read_metrics

    hf, folder = hf_folder(tmp_path, "mistral", sliding_window=16)
    tokenizer_folder(folder)
    cfg = load_config(
        None,
        {
            "model.from_hf": str(folder),
            "data.path": str(write_sft_jsonl(tmp_path / "d.jsonl")),
            "data.format": "sft",
            "train.seq_len": 32,
            "train.max_steps": 2,
            "train.device": "cpu",
            "train.output_dir": str(tmp_path / "run"),
            "train.progress": "none",
        },
    )
    Trainer(cfg).train()  # a window of 16 inside rows of 32: the sliding and document masks together
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
