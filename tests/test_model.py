import pytest
import torch
import torch.nn.functional as F

from trainer.models import KernelChoice, ModelArgs, build, load_hf, save_hf
from trainer.models.config import resolve_args

ARGS = dict(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=80,
    n_layers=2,
    n_heads=6,
    n_kv_heads=2,
    max_seq_len=64,
    rope_theta=5000.0,
    norm_eps=1e-6,
)


def make(seed=0, **changes):
    torch.manual_seed(seed)
    return build(ModelArgs(**{**ARGS, **changes})).double()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_loss_is_mean_cross_entropy_of_logits_fused_or_not():
    model = make()
    x = torch.randint(0, 97, (3, 17))
    y = torch.randint(0, 97, (3, 17))
    y[0, :5] = -100
    logits = model(x)
    assert logits.shape == (3, 17, 97)
    expected = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    fused = model(x, labels=y)
    model.set_kernels(KernelChoice.eager())
    eager = model(x, labels=y)
    assert abs(fused.item() - expected.item()) < 1e-12 and abs(eager.item() - expected.item()) < 1e-12
    total = model(x, labels=y, reduction="sum")
    assert abs(total.item() - expected.item() * (y != -100).sum().item()) < 1e-9


def test_fused_and_materialised_gradients_agree():
    grads = []
    for kernels in (KernelChoice(), KernelChoice.eager()):
        model = make()
        model.set_kernels(kernels)
        x = torch.randint(0, 97, (2, 9))
        torch.manual_seed(1)
        model(x, labels=torch.randint(0, 97, (2, 9))).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        assert rel(grads[0][name], grads[1][name]) < 1e-12, name


def test_document_mask_equals_running_each_document_alone():
    model = make()
    a, b = torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 10))
    packed = torch.cat([a, b], dim=1)
    document_ids = torch.tensor([[0] * 7 + [1] * 10])
    position_ids = torch.tensor([list(range(7)) + list(range(10))])
    out = model(packed, position_ids=position_ids, document_ids=document_ids)
    alone = torch.cat([model(a), model(b)], dim=1)
    assert rel(out, alone) < 1e-12
    assert rel(model(packed)[:, 7:], model(b)) > 1e-3  # without the mask the second document sees the first


def test_sequence_longer_than_the_model_allows_is_refused():
    model = make()
    with pytest.raises(ValueError, match=r"longer than the model allows \(max_seq_len 64\)"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_presets():
    tiny = resolve_args("tiny", tokenizer_vocab=4096)
    assert 0.5e6 < tiny.num_params() < 1.5e6 and tiny.n_kv_heads < tiny.n_heads
    assert resolve_args("tiny", tokenizer_vocab=257).vocab_size == 320  # padded to a multiple of 64
    assert 7.5e9 < resolve_args("llama-8b").num_params() < 8.1e9
    assert 6.6e9 < resolve_args("llama-7b").num_params() < 6.8e9
    assert 1.2e9 < resolve_args("llama-1b").num_params() < 1.3e9
    model = build("tiny", vocab_size=4096)
    assert sum(p.numel() for p in model.parameters()) == model.args.num_params()


def test_save_and_load_round_trip(tmp_path):
    for changes in ({}, {"tie_embeddings": True, "qkv_bias": True, "family": "qwen2"}):
        model = make(**changes).float()
        save_hf(model, tmp_path / str(len(changes)))
        loaded = load_hf(tmp_path / str(len(changes)))
        x = torch.randint(0, 97, (2, 11))
        assert torch.equal(model(x), loaded(x))


@pytest.mark.parametrize("changes", [{}, {"qkv_bias": True, "family": "qwen2"}, {"tie_embeddings": True}])
def test_against_hf_logits(tmp_path, changes):
    transformers = pytest.importorskip("transformers")
    model = make(seed=3, **changes).float()
    save_hf(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    x = torch.randint(0, 97, (2, 23))
    with torch.no_grad():
        assert rel(model(x), hf(x).logits) <= 1e-5
