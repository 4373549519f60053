"""LoRA inside a whole run: small checkpoints, exact resume, final/ in PEFT's format beside a merged
model, eval and generate on an adapter, and the mistakes a user can make with them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.helpers import StopAt, tiny_config
from tests.test_cli import run_cli
from tests.test_parallel import REPO, _overrides, step_records, torchrun, train_one_process
from trainer import Trainer
from trainer.config import to_toml
from trainer.errors import CheckpointError, ConfigError
from trainer.metrics import read_metrics
from trainer.models import build, save_hf


@pytest.fixture
def base(tmp_path):
    """A pretrained (random) tiny model as a Hugging Face folder, with the byte tokenizer's vocabulary."""
    folder = tmp_path / "base"
    save_hf(build("tiny", vocab_size=320, seed=3), folder)
    return folder


def lora_config(tmp_path, base, **overrides):
    values = dict(
        model__from_hf=str(base),
        model__preset="small",
        model__allow_new_tokenizer=True,
        lora__rank=4,
        lora__alpha=8.0,
        train__max_steps=4,
        checkpoint__save_every=2,
        optim__lr=1e-2,
    )
    values.update(overrides)
    return tiny_config(tmp_path, **values)


def losses(run):
    return [(r["step"], r.get("loss", r.get("eval_loss"))) for r in read_metrics(run / "metrics.jsonl")]


def test_a_lora_run_writes_small_checkpoints_and_a_peft_final_with_a_merged_model(tmp_path, base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    Trainer(lora_config(tmp_path, base)).train()
    run = tmp_path / "run"
    checkpoint = run / "checkpoint-4"
    assert (checkpoint / "adapter_config.json").is_file() and not (checkpoint / "model.safetensors").exists()
    full_bytes = (base / "model.safetensors").stat().st_size
    assert (checkpoint / "adapter_model.safetensors").stat().st_size < full_bytes / 5
    assert (checkpoint / "training_state.pt").stat().st_size < full_bytes / 2  # Adam states of the adapters only

    final = run / "final"
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["base_model_name_or_path"] == str(base)
    ids = torch.randint(0, 257, (2, 24))
    with torch.no_grad():
        base_model = AutoModelForCausalLM.from_pretrained(base)
        base_logits = base_model(ids).logits
        peft_logits = PeftModel.from_pretrained(base_model, final)(ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(final / "merged")(ids).logits
    assert ((peft_logits - merged_logits).norm() / merged_logits.norm()) <= 1e-5
    assert ((merged_logits - base_logits).norm() / base_logits.norm()) > 1e-3  # the adapters learned something


def test_a_lora_run_resumes_exactly(tmp_path, base):
    common = dict(train__max_steps=6, train__eval_every=2, lora__dropout=0.1)
    Trainer(lora_config(tmp_path, base, train__output_dir=str(tmp_path / "a"), **common)).train()
    Trainer(lora_config(tmp_path, base, train__output_dir=str(tmp_path / "b"), **common), callbacks=[StopAt(2)]).train()
    Trainer(
        lora_config(tmp_path, base, train__output_dir=str(tmp_path / "b"), checkpoint__resume_from="latest", **common)
    ).train()
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_lora_and_full_checkpoints_do_not_mix(tmp_path, base):
    Trainer(lora_config(tmp_path, base, train__max_steps=2)).train()
    with pytest.raises(CheckpointError, match="holds LoRA adapters, but this run trains the full model"):
        Trainer(lora_config(tmp_path, base, lora__rank=0, train__max_steps=4, checkpoint__resume_from="latest")).train()
    Trainer(
        lora_config(tmp_path, base, lora__rank=0, train__max_steps=2, train__output_dir=str(tmp_path / "full"))
    ).train()
    with pytest.raises(CheckpointError, match="holds a full model, but this run trains LoRA adapters"):
        Trainer(
            lora_config(
                tmp_path,
                base,
                train__max_steps=4,
                train__output_dir=str(tmp_path / "full"),
                checkpoint__resume_from="latest",
            )
        ).train()


def test_lora_needs_a_pretrained_model(tmp_path):
    with pytest.raises(ConfigError, match="lora.rank=4 adapts a pretrained model: set model.from_hf"):
        Trainer(tiny_config(tmp_path, lora__rank=4)).train()


def test_eval_and_generate_take_a_lora_final_and_name_a_missing_base(tmp_path, base):
    Trainer(lora_config(tmp_path, base, train__max_steps=2)).train()
    final = tmp_path / "run" / "final"
    proc = run_cli("eval", str(final), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    logged = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval_loss" in r][-1]
    assert f"eval_loss {logged['eval_loss']:.4f}" in proc.stdout
    proc = run_cli("generate", str(final), "--prompt", "the model", "--max-new-tokens", "4", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr

    shutil.move(base, tmp_path / "moved")
    proc = run_cli("eval", str(final), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "is a LoRA adapter of the base model" in lines[0] and "merged" in lines[0]


def test_qlora_trains_on_cpu_and_writes_a_dequantized_merged_model(tmp_path, base):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    Trainer(lora_config(tmp_path, base, lora__quantize="nf4", train__max_steps=3)).train()
    steps = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(steps) == 3 and all(r["loss"] is not None for r in steps)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final" / "merged")
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    # The packed 4-bit storage (two weights a byte) counts as the weights it holds: the base's size.
    base_size = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(base).parameters())
    results = json.loads((tmp_path / "run" / "train_results.json").read_text())
    assert results["parameters"] == base_size + sum(p.numel() for p in adapter_tensors(tmp_path / "run" / "final"))


def adapter_tensors(folder):
    from safetensors.torch import load_file

    return list(load_file(str(folder / "adapter_model.safetensors")).values())


def test_qlora_quantizes_each_layer_on_its_way_to_the_device(tmp_path, base, monkeypatch):
    """The device never holds the full-precision base whole: the model is not moved there before its
    targeted layers are quantized, each straight onto the run's device; the rest follows after."""
    pytest.importorskip("bitsandbytes")
    import trainer.build as build_module
    from trainer.models.llama import Transformer

    events = []
    real_apply, real_to = build_module.apply_lora, torch.nn.Module.to

    def apply_lora(model, lora_cfg, compute_dtype, device=None, seed=0, fsdp_ranks=None):
        events.append(("apply_lora", device))
        return real_apply(model, lora_cfg, compute_dtype, device=device, seed=seed, fsdp_ranks=fsdp_ranks)

    def to(module, *args, **kwargs):
        moved_to = kwargs.get("device", args[0] if args and not isinstance(args[0], torch.dtype) else None)
        if isinstance(module, Transformer) and moved_to is not None:
            events.append(("to", torch.device(moved_to)))
        return real_to(module, *args, **kwargs)

    monkeypatch.setattr(build_module, "apply_lora", apply_lora)
    monkeypatch.setattr(torch.nn.Module, "to", to)
    Trainer(lora_config(tmp_path, base, lora__quantize="nf4", train__max_steps=1, train__device="cpu")).train()
    assert events[:2] == [("apply_lora", torch.device("cpu")), ("to", torch.device("cpu"))]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(("strategy", "quantize"), [("ddp", "none"), ("fsdp", "none"), ("ddp", "nf4")])
def test_lora_on_two_ranks_equals_one_process_and_resumes(tmp_path, base, strategy, quantize):
    from tests.helpers import write_corpus

    if quantize == "nf4":
        pytest.importorskip("bitsandbytes")

    write_corpus(tmp_path / "corpus")
    extra = dict(
        model__from_hf=str(base),
        model__preset="small",
        model__allow_new_tokenizer=True,
        lora__rank=4,
        lora__quantize=quantize,
        optim__lr=1e-2,
        checkpoint__save_every=2,
    )
    train_one_process(_overrides(tmp_path, "one", train__micro_batch_size=4, **extra))
    result = torchrun(
        [
            "-m",
            "trainer",
            "train",
            *_overrides(tmp_path, "two", train__micro_batch_size=2, parallel__strategy=strategy, **extra),
        ]
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    one, two = step_records(tmp_path / "one"), step_records(tmp_path / "two")
    for step in one:
        assert abs(one[step]["loss"] - two[step]["loss"]) <= 1e-5 * abs(one[step]["loss"]), step
    assert (tmp_path / "two" / "final" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "two" / "final" / "merged" / "model.safetensors").is_file()
    # The 2-rank run's checkpoint resumes on 2 ranks for the last steps.
    (tmp_path / "two" / "final").rename(tmp_path / "two-final")
    result = torchrun(
        [
            "-m",
            "trainer",
            "train",
            *_overrides(
                tmp_path,
                "two",
                train__micro_batch_size=2,
                parallel__strategy=strategy,
                train__max_steps=7,
                checkpoint__resume_from="latest",
                **extra,
            ),
        ]
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert sorted(step_records(tmp_path / "two")) == list(range(1, 8))


@pytest.mark.slow
@pytest.mark.distributed
def test_qlora_under_fsdp_equals_one_process_on_the_dequantized_base_and_resumes(tmp_path):
    """Two FSDP2 ranks each read every base weight whole, quantize it with torchao and keep their
    rows: the 4-bit weights are torchao's quantization of the whole tensor, the same on any number
    of ranks. So the run's losses and merged model equal one process training LoRA on a base whose
    weights are that quantization dequantized (torchao's own to_nf4 / get_original_weight).
    Quantizing each rank's rows alone (their own scale mean) is 1.5e-4 off at the first step."""
    import re

    from safetensors.torch import load_file, save_file
    from torchao.quantization import to_nf4

    from tests.helpers import write_corpus
    from trainer.models.config import ModelArgs

    write_corpus(tmp_path / "corpus")
    # 256-wide: each rank's rows of every projection hold whole 64 x 256 quantization groups
    args = ModelArgs(vocab_size=320, hidden_size=256, intermediate_size=512, n_layers=2, n_heads=4, n_kv_heads=2)
    save_hf(build(args, seed=3), tmp_path / "base")
    shutil.copytree(tmp_path / "base", tmp_path / "dequantized")
    weights = load_file(tmp_path / "base" / "model.safetensors")
    for name, tensor in weights.items():
        if re.search(r"(self_attn|mlp)\.\w+_proj\.weight$", name):
            weights[name] = to_nf4(tensor).get_original_weight()
    save_file(weights, tmp_path / "dequantized" / "model.safetensors", metadata={"format": "pt"})
    common = dict(
        model__preset="small", model__allow_new_tokenizer=True, lora__rank=4, optim__lr=1e-2, checkpoint__save_every=2
    )
    train_one_process(
        _overrides(tmp_path, "one", model__from_hf=str(tmp_path / "dequantized"), train__micro_batch_size=4, **common)
    )
    two = _overrides(
        tmp_path,
        "two",
        model__from_hf=str(tmp_path / "base"),
        lora__quantize="nf4",
        parallel__strategy="fsdp",
        train__micro_batch_size=2,
        **common,
    )
    result = torchrun(["-m", "trainer", "train", *two])
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    one, first = step_records(tmp_path / "one"), step_records(tmp_path / "two")
    assert sorted(first) == sorted(one) == [1, 2, 3, 4, 5]
    for step in one:
        assert abs(one[step]["loss"] - first[step]["loss"]) <= 1e-5 * abs(one[step]["loss"]), step
    want = load_file(tmp_path / "one" / "final" / "merged" / "model.safetensors")
    got = load_file(tmp_path / "two" / "final" / "merged" / "model.safetensors")
    assert set(got) == set(want)
    # Adam's normalised steps turn the ~1e-7 rounding difference between one and two ranks' gradient
    # sums into up to a few 1e-6 in a few merged weights after 5 steps at lr 1e-2 (measured with
    # seeds 0-3 and either loss path: 1.2e-7 to 4.4e-6); a base quantized per rank, or a wrong shard
    # in the export, is 1e-4 or more.
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)
    # Resumed on two ranks from checkpoint-2: the base is quantized again, the adapters read back.
    for later in [tmp_path / "two" / "final", *(tmp_path / "two").glob("checkpoint-[45]")]:
        shutil.rmtree(later)
    result = torchrun(["-m", "trainer", "train", *two, "--checkpoint.resume_from=latest"])
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    resumed = step_records(tmp_path / "two")
    for step in (3, 4, 5):
        assert abs(resumed[step]["loss"] - first[step]["loss"]) <= 1e-6 * abs(first[step]["loss"]), step


def test_config_round_trip_keeps_the_lora_section(tmp_path, base):
    cfg = lora_config(tmp_path, base, lora__target="q_proj|v_proj")
    assert 'target = "q_proj|v_proj"' in to_toml(cfg) and REPO.is_dir()


def test_the_documented_peft_recipe_reproduces_a_qlora_merged_model(tmp_path, base):
    """docs/finetuning.md's lines, run as written (paths filled in), give final/merged/'s logits;
    the adapter on the full-precision base does not."""
    pytest.importorskip("bitsandbytes")
    import re

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    Trainer(lora_config(tmp_path, base, lora__quantize="nf4", train__max_steps=3, optim__lr=5e-2)).train()
    final = tmp_path / "run" / "final"
    doc = (REPO / "docs" / "finetuning.md").read_text()
    (recipe,) = [b for b in re.findall(r"```python\n(.*?)```", doc, re.S) if "bnbf.dequantize_4bit" in b]
    recipe = recipe.replace("/models/Llama-2-7b-hf", str(base)).replace("runs/<run>/final", str(final))
    scope = {}
    exec(recipe, scope)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    ours = AutoModelForCausalLM.from_pretrained(final / "merged")
    with torch.no_grad():
        expected, got = ours(ids).logits, scope["merged"](ids).logits
        full_precision = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), final).merge_and_unload()
        off = full_precision(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (off - expected).abs().max() > 100 * 1e-5  # the step the recipe takes is the one that matters
