"""Every family of the registry against transformers' own model, and through a whole run: loss and
gradients, training from model.from_hf with an exact resume, final/ loaded by the same transformers
class, and QLoRA into an adapter that PEFT loads. (Logits, the save round trip, patch_hf and LoRA
with PEFT are in tests/test_hf.py and tests/test_lora.py.)"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import tiny_config
from tests.test_hf import FAMILIES, hf_folder, rel, tokens
from trainer import Trainer
from trainer.constants import IGNORE_INDEX
from trainer.metrics import read_metrics
from trainer.models import load_hf
from trainer.models.families import BY_NAME
from trainer.models.families import FAMILIES as REGISTRY

transformers = pytest.importorskip("transformers")


def test_every_registered_family_is_tested():
    assert {f.name for f in REGISTRY} == set(FAMILIES)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_against_hf_loss_and_gradients(tmp_path, family):
    hf, folder = hf_folder(tmp_path, family)
    hf.train()  # no dropout in any of them: train mode only so gradients flow as in training
    ours = load_hf(folder).train()
    x = tokens(t=23)
    x[0, 3] = 5  # a token repeated, so the embedding's gradient sums over positions
    hf_loss = hf(x, labels=x).loss  # transformers shifts the labels itself
    labels = torch.cat([x[:, 1:], torch.full_like(x[:, :1], IGNORE_INDEX)], dim=1)
    our_loss = ours(x, labels=labels)
    assert rel(our_loss.detach(), hf_loss.detach()) <= 1e-5
    hf_loss.backward()
    our_loss.backward()
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None and rel(p.grad, theirs[name].grad) <= 1e-4, name


def family_run(tmp_path, folder, name, **overrides):
    cfg = tiny_config(
        tmp_path,
        model__from_hf=str(folder),
        model__preset="small",
        model__allow_new_tokenizer=True,
        train__output_dir=str(tmp_path / name),
        train__max_steps=4,
        train__seq_len=24,
        checkpoint__save_every=2,
        **overrides,
    )
    Trainer(cfg).train()
    return {r["step"]: r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_family_trains_from_hf_resumes_exactly_and_saves_back(tmp_path, family):
    hf, folder = hf_folder(tmp_path, family, vocab_size=320)  # the byte tokenizer's ids fit
    full = family_run(tmp_path, folder, "run")
    assert len(full) == 4 and full[4] < full[1]
    (tmp_path / "run" / "checkpoint-4").rename(tmp_path / "run" / "later")  # resume from step 2
    resumed = family_run(tmp_path, folder, "run", checkpoint__resume_from=str(tmp_path / "run" / "checkpoint-2"))
    assert [resumed[s] for s in (3, 4)] == pytest.approx([full[s] for s in (3, 4)], rel=1e-6)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert type(back).__name__ == BY_NAME[family].architecture == type(hf).__name__


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_qlora_on_a_family_writes_an_adapter_peft_loads(tmp_path, family):
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel

    _, folder = hf_folder(tmp_path, family, vocab_size=320)
    losses = family_run(tmp_path, folder, "qlora", lora__rank=4, lora__quantize="nf4", optim__lr=1e-2)
    assert len(losses) == 4 and all(v == v for v in losses.values())
    base = transformers.AutoModelForCausalLM.from_pretrained(folder)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "qlora" / "final")
    changed = sum(p.abs().sum() for n, p in peft_model.named_parameters() if "lora_B" in n)
    assert changed > 0  # the trained adapters arrived


@pytest.mark.distributed
@pytest.mark.parametrize(  # the most distinct blocks: sandwich norms and softcaps, fused layers
    "family, strategy", [("gemma2", "fsdp"), ("phi3", "fsdp"), ("gemma2", "ddp")]
)
def test_a_family_on_two_ranks_equals_one_process(tmp_path, family, strategy):
    from tests.helpers import write_corpus
    from tests.test_parallel import _overrides, assert_same_steps, train_one_process, train_two_ranks

    _, folder = hf_folder(tmp_path, family, vocab_size=320)
    write_corpus(tmp_path / "corpus")
    common = {"model__from_hf": str(folder), "model__preset": "small", "model__allow_new_tokenizer": "true"}
    train_one_process(_overrides(tmp_path, "one", train__micro_batch_size=4, **common))
    train_two_ranks(_overrides(tmp_path, strategy, train__micro_batch_size=2, parallel__strategy=strategy, **common))
    assert_same_steps(tmp_path / strategy, tmp_path / "one", range(1, 6))


@pytest.mark.slow
def test_gemma2_compiled_and_checkpointed_equals_eager(tmp_path):
    """The most distinct block (four norms, softcapped attention computed outside SDPA, GeGLU) under
    torch.compile and selective checkpointing: the eager losses. One layer keeps the CPU compile short."""
    _, folder = hf_folder(tmp_path, "gemma2", vocab_size=320, num_hidden_layers=1)
    eager = family_run(tmp_path, folder, "eager")
    torch._dynamo.reset()
    compiled = family_run(
        tmp_path, folder, "compiled", parallel__compile=True, parallel__activation_checkpointing="selective"
    )
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    assert [compiled[s] for s in sorted(compiled)] == pytest.approx([eager[s] for s in sorted(eager)], rel=1e-5)
