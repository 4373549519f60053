"""LoRA and QLoRA (trainer/lora.py): what trains, the layer against an fp64 reference, kernels, bf16,
checkpointing, PEFT's loader and merge as the reference for our adapter folder and merged model,
4-bit bases, checkpoints of trainable tensors, and the errors."""

from __future__ import annotations

import copy
import io
import json
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tests.helpers import tiny_config
from trainer import lora
from trainer.config import LoraConfig
from trainer.errors import CheckpointError, ConfigError
from trainer.models import KernelChoice, build, load_hf, save_hf
from trainer.models.config import ModelArgs
from trainer.optim import build_optimizer
from trainer.parallel import apply_activation_checkpointing

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# Odd sizes on purpose: 48 x 80 MLP matrices, head_dim 12, 2 key/value heads for 4 query heads.
ARGS = dict(vocab_size=97, hidden_size=48, intermediate_size=80, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
HF_SHAPE = dict(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
)
TARGETED = 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def settings(**changes) -> LoraConfig:
    return LoraConfig(**{"rank": 4, "alpha": 8.0, **changes})


def small_model(tie=False, kernels=None, seed=0):
    return build(ModelArgs(**ARGS, tie_embeddings=tie), kernels=kernels, seed=seed)


def tokens(n=2, t=13, seed=1):
    return torch.randint(0, ARGS["vocab_size"], (n, t), generator=torch.Generator().manual_seed(seed))


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def loss_of(model, seed=0):
    ids = tokens(t=17, seed=seed)
    return model(ids[:, :-1], labels=ids[:, 1:])


@torch.no_grad()
def perturb_adapters(model, seed=0):
    """B starts at zero (the adapter adds nothing): give every adapter and unfrozen weight a visible change."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def hf_base(tmp_path, family="llama", tie=False, name="base"):
    """A base model made by transformers itself (norms and biases perturbed so every tensor shows), saved."""
    config_cls, model_cls, extra = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 12}),
        "olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM, {}),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, {"pad_token_id": 0, "eos_token_id": 2}),
        "gemma2": (
            transformers.Gemma2Config,
            transformers.Gemma2ForCausalLM,
            {"head_dim": 12, "sliding_window": 5, "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0},
        ),
        "gemma3": (
            transformers.Gemma3TextConfig,
            transformers.Gemma3ForCausalLM,
            {"head_dim": 12, "sliding_window": 5},
        ),
    }[family]
    torch.manual_seed(0)
    model = model_cls(config_cls(**HF_SHAPE, tie_word_embeddings=tie, **extra))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("norm.weight", "bias")):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


# ---------------------------------------------------------------- what trains


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("embeddings,norms", [(False, False), (True, True)])
def test_only_adapters_and_unfrozen_modules_train(tie, embeddings, norms):
    model = small_model(tie)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora.apply_lora(model, settings(train_embeddings=embeddings, train_norms=norms))
    assert len(model.lora.targets) == TARGETED
    expected = {n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert len(expected) == 2 * TARGETED
    if embeddings:
        expected |= {"model.embed_tokens.weight"} | (set() if tie else {"lm_head.weight"})
    if norms:
        expected |= {n for n in before if n.endswith("norm.weight")}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)

    optimizer = build_optimizer(
        model, SimpleNamespace(name="adamw", lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    )
    for step in range(3):
        loss_of(model, step).backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == (n in expected), n
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    trained = {p for group in optimizer.param_groups for p in group["params"]}
    assert {n for n, p in model.named_parameters() if p in trained} == expected
    assert set(optimizer.state) <= trained
    for n, p in model.named_parameters():
        original = n.replace(".base_layer.", ".")
        if n in expected and ".lora_" not in n:
            assert not torch.equal(p, before[original]), f"{n} did not train"
        elif n not in expected:
            assert torch.equal(p, before[original]), f"frozen {n} changed"
    assert all(m.lora_B.weight.abs().sum() > 0 for m in model.modules() if isinstance(m, lora.LoraLinear))


def test_layerwise_adamw_steps_the_adapters_as_adamw_does():
    """Layer-wise hooks go on the trainable tensors only; frozen weights get neither hooks nor state."""
    reference = lora.apply_lora(small_model(), settings(train_norms=True))
    perturb_adapters(reference)
    layerwise = copy.deepcopy(reference)
    config = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    reference_optimizer = build_optimizer(reference, SimpleNamespace(name="adamw", **config))
    layerwise_optimizer = build_optimizer(layerwise, SimpleNamespace(name="adamw_layerwise", **config))
    assert len(layerwise_optimizer.optimizer_of) == 2 * TARGETED + 2 * ARGS["n_layers"] + 1
    for step in range(2):
        loss_of(reference, step).backward()
        reference_optimizer.step()
        reference_optimizer.zero_grad(set_to_none=True)
        loss_of(layerwise, step).backward()  # the update happens here
    for (name, p), q in zip(reference.named_parameters(), layerwise.parameters(), strict=True):
        assert (q - p).norm() <= 1e-6 * p.norm(), name


def test_lora_linear_matches_fp64_reference_forward_and_backward():
    torch.manual_seed(0)
    for in_features, out_features, rank, bias in ((48, 80, 4, False), (33, 17, 5, True), (64, 64, 8, False)):
        base = nn.Linear(in_features, out_features, bias=bias)
        layer = lora.LoraLinear(base, rank, alpha=12.0, dropout=0.0)
        with torch.no_grad():
            layer.lora_B.weight.normal_()
        x = torch.randn(3, 7, in_features, requires_grad=True)
        out = layer(x)
        grad_out = torch.randn_like(out)
        out.backward(grad_out)

        w, a, b = (
            t.detach().double().requires_grad_() for t in (base.weight, layer.lora_A.weight, layer.lora_B.weight)
        )
        x64 = x.detach().double().requires_grad_()
        ref = x64 @ w.T + (12.0 / rank) * (x64 @ a.T) @ b.T
        if bias:
            ref = ref + base.bias.double()
        ref.backward(grad_out.double())
        assert rel(out, ref) < 1e-6
        assert rel(x.grad, x64.grad) < 1e-6
        assert rel(layer.lora_A.weight.grad, a.grad) < 1e-6
        assert rel(layer.lora_B.weight.grad, b.grad) < 1e-6
        assert base.weight.grad is None


def test_dropout_acts_on_the_adapter_input_in_training_only():
    torch.manual_seed(0)
    base = nn.Linear(32, 24)
    layer = lora.LoraLinear(base, 4, alpha=8.0, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(5, 32)
    no_dropout = base(x) + 2.0 * layer.lora_B(layer.lora_A(x))
    layer.eval()
    assert rel(layer(x), no_dropout) < 1e-6
    layer.train()
    torch.manual_seed(3)
    mask = torch.nn.functional.dropout(torch.ones_like(x), 0.5, training=True)
    torch.manual_seed(3)
    assert rel(layer(x), base(x) + 2.0 * layer.lora_B(layer.lora_A(x * mask))) < 1e-6


def test_initial_adapter_leaves_the_model_unchanged_and_a_follows_peft_init():
    model = small_model()
    x = tokens()
    with torch.no_grad():
        expected = model(x)
    lora.apply_lora(model, settings())
    with torch.no_grad():
        assert torch.equal(model(x), expected)  # B = 0
    a = model.model.layers[0].mlp.down_proj.lora_A.weight  # 4 x 80: Kaiming-uniform, bound 1 / sqrt(fan_in)
    assert a.abs().max() <= 1 / 80**0.5 and a.abs().max() > 0.8 / 80**0.5


# ---------------------------------------------------------------- kernels, precision, checkpointing


def test_kernels_path_equals_reference_path():
    """Triton kernels (interpreted on CPU) and the fused loss against the eager reference, with LoRA."""
    reference = small_model(kernels=KernelChoice.eager())
    lora.apply_lora(reference, settings(train_norms=True))
    perturb_adapters(reference)
    kernels = copy.deepcopy(reference)
    kernels.set_kernels(KernelChoice.everywhere("triton"))
    losses, grads = [], []
    for model in (reference, kernels):
        loss = loss_of(model)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert rel(losses[1], losses[0]) < 1e-5
    for name, grad in grads[0].items():
        assert rel(grads[1][name], grad) < 1e-4, name


def test_bf16_base_with_fp32_adapters_under_autocast():
    fp32 = small_model(tie=True)
    lora.apply_lora(fp32, settings(train_norms=True, train_embeddings=True))
    perturb_adapters(fp32)
    bf16 = small_model(tie=True).to(torch.bfloat16)
    lora.apply_lora(bf16, settings(train_norms=True, train_embeddings=True))
    lora.load_trainable_state_dict(bf16, lora.trainable_state_dict(fp32), "fp32 twin")
    assert bf16.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in bf16.parameters() if p.requires_grad)
    assert bf16.lm_head.weight is bf16.model.embed_tokens.weight  # the upcast kept the tie
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_of(bf16)
    loss.backward()
    expected = loss_of(fp32)
    assert abs(loss.item() - expected.item()) < 2e-2 * expected.item()  # bf16 rounding of weights and matmuls
    for name, p in bf16.named_parameters():
        if p.requires_grad:
            assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_with_dropout_gives_the_same_gradients(mode):
    plain = small_model()
    lora.apply_lora(plain, settings(dropout=0.3))
    perturb_adapters(plain)
    checkpointed = copy.deepcopy(plain)
    apply_activation_checkpointing(checkpointed, mode)
    grads = []
    for model in (plain, checkpointed):
        torch.manual_seed(5)  # the same dropout masks; recomputation must replay them
        loss_of(model).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        assert rel(grads[1][name], grad) < 1e-6, name


# ---------------------------------------------------------------- PEFT's format, against PEFT itself


@pytest.mark.parametrize(
    "family,tie,embeddings,norms",
    [
        ("llama", False, False, False),
        ("llama", False, True, True),
        ("llama", True, True, False),
        ("qwen2", False, False, True),  # q/k/v biases stay in the base layers
        ("qwen3", False, False, True),  # the q/k norms train with the other norms
        ("olmo2", False, True, True),  # norms after attention and MLP, over the whole q/k projections
        ("phi3", False, False, False),  # adapters on the fused qkv_proj and gate_up_proj, as PEFT names them
        ("gemma2", True, False, True),  # four norms a block with (1 + weight), tied head, softcaps
        ("gemma3", True, True, True),  # q/k norms among the unfrozen norms
    ],
)
def test_peft_loads_our_adapter_and_merges_to_our_merged_model(tmp_path, family, tie, embeddings, norms):
    base = hf_base(tmp_path, family, tie)
    model = load_hf(base)
    lora.apply_lora(model, settings(target="q_proj|v_proj|down_proj", train_embeddings=embeddings, train_norms=norms))
    perturb_adapters(model)
    model.eval()
    x = tokens()
    with torch.no_grad():
        ours = model(x)
    lora.save_adapter(model, tmp_path / "adapter", base)
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["task_type"] == "CAUSAL_LM"
    assert (written["r"], written["lora_alpha"], written["lora_dropout"]) == (4, 8.0, 0.0)
    # Phi-3's q, k and v are one qkv_proj, which "v_proj" also matches.
    expected = ["down_proj", "qkv_proj"] if family == "phi3" else ["down_proj", "q_proj", "v_proj"]
    assert sorted(written["target_modules"]) == expected
    assert written["base_model_name_or_path"] == str(base.resolve())

    hf = transformers.AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        base_logits = hf(x).logits
        peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
        assert rel(peft_model(x).logits, ours) <= 1e-5
        peft_merged = peft_model.merge_and_unload()(x).logits
    save_hf(lora.merged_model(model), tmp_path / "merged")
    ours_merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert rel(ours_merged(x).logits, peft_merged) <= 1e-5
    assert rel(peft_merged, base_logits) > 1e-2  # the adapters changed the model

    reloaded = lora.load_adapter_model(tmp_path / "adapter")
    assert not reloaded.training
    with torch.no_grad():
        assert rel(reloaded(x), ours) <= 1e-6


def test_full_target_names_are_written_when_short_names_would_select_more(tmp_path):
    base = hf_base(tmp_path)
    model = load_hf(base)
    lora.apply_lora(model, settings(target=r"layers\.1\.self_attn\.q_proj"))
    perturb_adapters(model)
    lora.save_adapter(model, tmp_path / "adapter", base)
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["target_modules"] == ["model.layers.1.self_attn.q_proj"]
    x = tokens()
    hf = transformers.AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        assert rel(peft.PeftModel.from_pretrained(hf, tmp_path / "adapter")(x).logits, model.eval()(x)) <= 1e-5


# ---------------------------------------------------------------- QLoRA


def test_nf4_base_trains_adapters_and_merges_dequantized():
    pytest.importorskip("bitsandbytes")
    dense = small_model()
    model = copy.deepcopy(dense)
    lora.apply_lora(model, settings(quantize="nf4", train_norms=True), compute_dtype=torch.float32)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer).__name__ == "Linear4bit" and q_proj.base_layer.weight.dtype == torch.uint8
    assert "nf4" in lora.lora_summary(model) and "4-bit" in lora.lora_summary(model)
    packed = {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype == torch.uint8}
    assert len(packed) == TARGETED
    optimizer = build_optimizer(
        model, SimpleNamespace(name="adamw", lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    )
    losses = []
    for _ in range(4):
        loss = loss_of(model)
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert losses[-1] < losses[0]  # the adapters (and norms) learn on the same batch
    for n, p in model.named_parameters():
        if n in packed:
            assert torch.equal(p, packed[n]) and p.grad is None, n

    # The merged weight is the dequantized nf4 weight plus B A: the same numbers the 4-bit layer
    # multiplies by (it dequantizes, then runs a dense matmul), so only fp32 summation order differs.
    model.eval()
    merged = lora.merged_model(model)
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    x = tokens()
    with torch.no_grad():
        quantized_logits, merged_logits = model(x), merged(x)
        assert rel(merged_logits, quantized_logits) <= 1e-5
        # ... and it is not the original dense model: the 4-bit rounding error is in it.
        w = dense.model.layers[0].self_attn.q_proj.weight
        assert rel(q_proj.dense_base_weight(), w) > 1e-2
        assert (
            rel(
                merged.model.layers[0].self_attn.q_proj.weight,
                w + q_proj.scaling * q_proj.lora_B.weight @ q_proj.lora_A.weight,
            )
            > 1e-2
        )


def test_nf4_adapter_reloads_onto_the_same_4bit_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    base = hf_base(tmp_path)
    model = load_hf(base)
    lora.apply_lora(model, settings(quantize="nf4"))
    perturb_adapters(model)
    lora.save_adapter(model, tmp_path / "adapter", base)
    reloaded = lora.load_adapter_model(tmp_path / "adapter", quantize="nf4")
    x = tokens()
    with torch.no_grad():
        assert torch.equal(reloaded(x), model.eval()(x))


# ---------------------------------------------------------------- checkpoints of trainable tensors


def test_trainable_state_round_trips_through_weights_only_load():
    model = small_model()
    lora.apply_lora(model, settings(train_norms=True))
    perturb_adapters(model)
    state = lora.trainable_state_dict(model)
    assert all(".lora_" in n or n.endswith("norm.weight") for n in state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    twin = small_model()
    lora.apply_lora(twin, settings(train_norms=True))
    lora.load_trainable_state_dict(twin, torch.load(buffer, weights_only=True), "buffer")
    x = tokens()
    with torch.no_grad():
        assert torch.equal(twin(x), model(x))


@pytest.mark.parametrize("tie", [False, True])
def test_an_adapter_folder_resumes_into_a_model_with_the_same_adapters(tmp_path, tie):
    model = lora.apply_lora(small_model(tie), settings(train_embeddings=True, train_norms=True))
    perturb_adapters(model)
    lora.save_adapter(model, tmp_path / "checkpoint", "unused-base")
    fresh = lora.apply_lora(small_model(tie, seed=1), settings(train_embeddings=True, train_norms=True))
    lora.load_adapter_weights(fresh, tmp_path / "checkpoint")
    saved = lora.trainable_state_dict(model)
    assert all(torch.equal(t, saved[n]) for n, t in lora.trainable_state_dict(fresh).items())
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight if tie else True
    with pytest.raises(CheckpointError, match=r"has no adapter_model.safetensors"):
        lora.load_adapter_weights(fresh, tmp_path)


def test_checkpoints_of_the_other_kind_or_other_settings_are_refused():
    full = small_model()
    adapted = lora.apply_lora(small_model(), settings())
    with pytest.raises(
        CheckpointError,
        match=r"checkpoint ck-3 holds a full model, but this run trains LoRA "
        r"adapters \(lora.rank=4\).*lora.rank=0",
    ):
        lora.load_trainable_state_dict(adapted, full.state_dict(), "ck-3")
    with pytest.raises(
        CheckpointError,
        match=r"checkpoint ck-3 holds LoRA adapters, but this run trains the "
        r"full model",
    ):
        lora.check_checkpoint_kind(lora.trainable_state_dict(adapted).keys(), full, "ck-3")
    lora.check_checkpoint_kind(full.state_dict().keys(), full, "ck-3")  # the same kind passes
    other_rank = lora.apply_lora(small_model(), settings(rank=8))
    with pytest.raises(CheckpointError, match=r"lora_A.weight is \(4, 48\) there but \(8, 48\) here"):
        lora.load_trainable_state_dict(other_rank, lora.trainable_state_dict(adapted), "ck-3")
    with_norms = lora.apply_lora(small_model(), settings(train_norms=True))
    with pytest.raises(CheckpointError, match=r"does not fit this run's LoRA settings: missing \['model.layers"):
        lora.load_trainable_state_dict(with_norms, lora.trainable_state_dict(adapted), "ck-3")


# ---------------------------------------------------------------- errors


def test_target_matching_nothing_or_the_head_is_refused():
    with pytest.raises(
        ConfigError,
        match=r"lora.target='attention' matches no linear layer of this model; "
        r"write a regex over module names such as model.layers.0.self_attn.q_proj",
    ):
        lora.apply_lora(small_model(), settings(target="attention"))
    with pytest.raises(ConfigError, match=r"matches lm_head, which cannot carry an adapter"):
        lora.apply_lora(small_model(), settings(target="proj|lm_head"))


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        (dict(lora__rank=-1), r"lora\.rank must be >= 0"),
        (dict(lora__rank=4, lora__alpha=0), r"lora\.alpha must be > 0"),
        (dict(lora__rank=4, lora__dropout=1.0), r"lora\.dropout must be in \[0, 1\)"),
        (dict(lora__rank=4, lora__target="(q_proj"), r"lora\.target='\(q_proj' is not a valid regex"),
        (dict(lora__rank=4, lora__quantize="nf8"), r"lora\.quantize='nf8' is not allowed; choose one of: none, nf4"),
        (dict(lora__quantize="nf4"), r"lora\.quantize=nf4 .*set lora\.rank > 0"),
        (dict(lora__rank=4, optim__name="galore_adamw"), r"galore_adamw with lora\.rank=4 is not supported: GaLore"),
        (dict(lora__rank=4, optim__name="apollo_adamw"), r"apollo_adamw with lora\.rank=4 is not supported: APOLLO"),
    ],
)
def test_bad_lora_values_are_refused_clearly(tmp_path, overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        tiny_config(tmp_path, **overrides)


def test_fsdp_nf4_base_computes_with_torchaos_dequantized_weight_and_keeps_it_4bit():
    """NF4Linear (QLoRA's base under FSDP2) against a float64 matmul with torchao's own dequantized
    weight, forward and input gradient, at a round and an odd batch; autograd keeps the 4-bit
    weight for backward, never a dense copy of it."""
    from torchao.quantization import to_nf4

    from trainer.models.nf4 import is_nf4

    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(256, 128, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(128, 256, generator=generator) * 0.05)
        linear.bias.copy_(torch.randn(128, generator=generator))
    dense = to_nf4(linear.weight.detach()).get_original_weight().double()
    layer = lora._shardable_quantizer(2)(linear, torch.device("cpu"))
    assert not layer.weight.requires_grad and is_nf4(layer.weight)
    for rows in (8, 13):
        x = torch.randn(rows, 256, generator=generator, requires_grad=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t) or t, lambda t: t):
            y = layer(x)
        upstream = torch.randn(rows, 128, generator=generator)
        y.backward(upstream)
        expected = x.detach().double() @ dense.t() + linear.bias.detach().double()
        assert rel(y.detach().double(), expected) < 1e-6
        assert rel(x.grad.double(), upstream.double() @ dense) < 1e-6
        dense_copies = [t for t in saved if not is_nf4(t) and t.shape == dense.shape]
        assert any(is_nf4(t) for t in saved) and not dense_copies


def test_fsdp_nf4_refuses_a_weight_its_ranks_cannot_split_into_whole_groups():
    """torchao splits 4-bit values and scales by rows: 48 x 48 weights hold no whole 64 x 256 group."""
    pytest.importorskip("torchao")
    with pytest.raises(ConfigError, match=r"cannot split a 48 x 48 weight over 2 rank\(s\): each rank's rows must"):
        lora.apply_lora(small_model(), settings(quantize="nf4"), fsdp_ranks=2)


def test_nf4_without_bitsandbytes_support_is_refused_in_one_line(monkeypatch):
    """What a device without bitsandbytes' 4-bit kernels looks like: its first 4-bit matmul raises."""
    bnb = pytest.importorskip("bitsandbytes")

    def unsupported(*args, **kwargs):
        raise RuntimeError("no kernel for this backend\nsecond line")

    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", unsupported)
    with pytest.raises(
        ConfigError,
        match=r"^lora\.quantize=nf4 needs bitsandbytes' 4-bit support on cpu with "
        r"compute dtype float32, which bitsandbytes .* does not provide here "
        r"\(RuntimeError: no kernel for this backend\); install .* or set "
        r"lora\.quantize=none$",
    ):
        lora.apply_lora(small_model(), settings(quantize="nf4"))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ConfigError, match=r"lora\.quantize=nf4 needs the bitsandbytes package: pip install"):
        lora.apply_lora(small_model(), settings(quantize="nf4"))


def test_adapter_with_a_missing_base_or_unsupported_options_is_refused(tmp_path):
    base = hf_base(tmp_path)
    model = lora.apply_lora(load_hf(base), settings())
    lora.save_adapter(model, tmp_path / "adapter", base)
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(CheckpointError, match=r"LoRA adapter of the base model '.*gone', which is not a folder"):
        lora.load_adapter_model(tmp_path / "adapter")
    config_file.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(CheckpointError, match=r"uses use_dora, which this trainer does not load"):
        lora.load_adapter_model(tmp_path / "adapter")
    with pytest.raises(CheckpointError, match=r"has no adapter_config.json"):
        lora.load_adapter_model(base)


def test_a_model_cannot_get_adapters_twice():
    model = lora.apply_lora(small_model(), settings())
    with pytest.raises(ValueError, match="already carries LoRA adapters"):
        lora.apply_lora(model, settings())


# ---------------------------------------------------------------- compile, FSDP2 and DDP


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_compiled_blocks_equal_eager_with_adapters(quantize):
    if quantize == "nf4":
        pytest.importorskip("bitsandbytes")
    from trainer.parallel.compile import apply_compile

    eager = build(ModelArgs(**{**ARGS, "n_layers": 1}), seed=0)  # one block keeps the CPU compile short
    lora.apply_lora(eager, settings(quantize=quantize, train_norms=True))
    perturb_adapters(eager)
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    apply_compile(compiled)  # fullgraph=True: a graph break in the adapter or the 4-bit layer fails here
    grads = []
    for model in (eager, compiled):
        loss_of(model).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    for name, grad in grads[0].items():
        assert rel(grads[1][name], grad) < 1e-5, name


DISTRIBUTED_CHECK = """
import copy, os, sys
import torch, torch.distributed as dist
from trainer import lora
from trainer.config import LoraConfig
from trainer.models import build
from trainer.models.config import ModelArgs
from trainer.parallel.fsdp import apply_ddp, apply_fsdp

dist.init_process_group("gloo")
rank = dist.get_rank()
model = build(ModelArgs(**{args}), seed=0)
quantize = "nf4" if sys.argv[1].endswith("nf4") else "none"
lora.apply_lora(model, LoraConfig(rank=4, alpha=8.0, train_norms=True, quantize=quantize))
assert ("4-bit" in lora.lora_summary(model)) == (quantize == "nf4")
gen = torch.Generator().manual_seed(0)
with torch.no_grad():
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
ids = torch.randint(0, 97, (4, 17), generator=torch.Generator().manual_seed(1))
reference = copy.deepcopy(model)  # one process, the whole batch
reference(ids[:, :-1], labels=ids[:, 1:]).backward()
if sys.argv[1] == "fsdp":
    apply_fsdp(model, torch.device("cpu"), param_dtype=None, reshard_after_forward=True, cpu_offload=False)
    train_model = model
else:
    train_model = apply_ddp(model, torch.device("cpu"))
half = ids[2 * rank:2 * rank + 2]  # equal token counts: the average of the halves' mean gradients is the whole's
train_model(half[:, :-1], labels=half[:, 1:]).backward()
expected = dict(reference.named_parameters())
checked = 0
for name, p in model.named_parameters():
    if not p.requires_grad:
        assert p.grad is None, name
        continue
    grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
    error = ((grad - expected[name].grad).norm() / expected[name].grad.norm()).item()
    assert error < 1e-5, (name, error)
    checked += 1
state = lora.trainable_state_dict(model)
assert set(state) == {{n for n, p in reference.named_parameters() if p.requires_grad}}
# a file per rank: two ranks printing to one pipe can interleave their lines
with open(f"{{sys.argv[2]}}/rank{{rank}}.ok", "w") as f:
    f.write(str(checked))
dist.barrier()  # gloo aborts a process that exits while its peer still has messages in flight
dist.destroy_process_group()
# Skips interpreter finalization, where a DDP run once aborted after passing ('terminate called without
# an active exception', SIGABRT): the results are already written.
os._exit(0)
"""


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["fsdp", "ddp", "ddp-nf4"])
def test_two_gloo_ranks_give_the_one_process_adapter_gradients(tmp_path, strategy):
    from tests.test_parallel import torchrun

    script = tmp_path / "check.py"
    script.write_text(DISTRIBUTED_CHECK.format(args=ARGS))
    run = torchrun([str(script), strategy, str(tmp_path)], timeout=150)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    checked = [(tmp_path / f"rank{rank}.ok").read_text() for rank in (0, 1)]
    assert checked == [str(2 * TARGETED + 5)] * 2
