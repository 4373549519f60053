"""Mixture of experts (trainer/models/moe.py) against transformers' own Mixtral and Qwen3-MoE, the
grouped matmul against an fp64 loop, and what training records: the load-balancing loss in the
objective and in metrics.jsonl, the experts' load, no host read between log steps.

The family-wide checks (logits, save round trip, from_hf training with resume, LoRA and QLoRA with
PEFT, patch_hf) run on both MoE families in tests/test_hf.py, test_families.py and test_lora.py."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from tests.helpers import tiny_config
from tests.test_cli import run_cli, tiny_args
from tests.test_hf import hf_folder, rel, tokens
from tests.test_sync_free import CountHostReads
from trainer import Trainer
from trainer.constants import IGNORE_INDEX
from trainer.metrics import read_metrics
from trainer.models import load_hf
from trainer.ops.grouped_mm import grouped_mm

transformers = pytest.importorskip("transformers")

CASES = {
    "mixtral": ("mixtral", {}),
    "qwen3_moe": ("qwen3_moe", {}),  # a dense layer among the MoE ones, top-k weights not renormalised
    "qwen3_moe-top3-every-second-layer": (
        "qwen3_moe",
        {"num_experts_per_tok": 3, "decoder_sparse_step": 2, "mlp_only_layers": [], "norm_topk_prob": True},
    ),
}


def labels_of(x):
    return torch.cat([x[:, 1:], torch.full_like(x[:, :1], IGNORE_INDEX)], dim=1)


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "loop"])
@pytest.mark.parametrize("case", list(CASES))
def test_against_hf_with_the_load_balancing_loss(tmp_path, monkeypatch, case, grouped):
    """`loop`: the per-expert loop that runs where torch._grouped_mm does not."""
    if not grouped:
        monkeypatch.setattr("trainer.ops.grouped_mm.grouped_mm_supported", lambda x, weight: False)
    family, changes = CASES[case]
    hf, folder = hf_folder(tmp_path, family, num_hidden_layers=3, **changes)
    hf.train()
    ours = load_hf(folder).train()
    x = tokens(t=23)
    out = hf(x, labels=x, output_router_logits=True)
    loss = ours(x, labels=labels_of(x))
    aux = ours.aux_loss()
    assert rel(aux.detach(), out.aux_loss.detach()) <= 1e-6
    total = loss + ours.args.router_aux_loss_coef * aux
    assert rel(total.detach(), out.loss.detach()) <= 1e-5
    out.loss.backward()
    total.backward()
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None and rel(p.grad, theirs[name].grad) <= 1e-4, name


def test_the_aux_loss_reaches_the_router():
    """Without the load-balancing term the router's gradient differs: the term is not dropped."""
    from trainer.models import build
    from trainer.models.config import ModelArgs

    args = ModelArgs(vocab_size=64, hidden_size=32, intermediate_size=48, n_layers=2, n_heads=4, n_kv_heads=2)
    args.n_experts, args.experts_per_token = 4, 2
    model = build(args, seed=0)
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    model(x, labels=labels_of(x)).backward()
    without = model.model.layers[0].mlp.gate.weight.grad.clone()
    model.zero_grad()
    (model(x, labels=labels_of(x)) + 0.5 * model.aux_loss()).backward()
    assert rel(model.model.layers[0].mlp.gate.weight.grad, without) > 1e-3


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "loop"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("sizes", [[3, 0, 7, 1], [16, 16], [0, 0, 5], [1, 9, 2, 0, 4]])
def test_grouped_mm_against_an_fp64_loop(sizes, dtype, tol, grouped):
    """Forward and backward of x's groups times their expert's weight, empty groups included."""
    g = torch.Generator().manual_seed(len(sizes) * 7 + sum(sizes))
    groups, d_in, d_out = len(sizes), 24, 40
    x = torch.randn(sum(sizes), d_in, generator=g)
    w = torch.randn(groups, d_out, d_in, generator=g)  # stored (out, in), used transposed as the model does
    grad = torch.randn(sum(sizes), d_out, generator=g)
    ends = torch.cumsum(torch.tensor(sizes), 0)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    ref = torch.cat([x64[e - n : e] @ w64[i].T for i, (n, e) in enumerate(zip(sizes, ends.tolist()))])
    ref.backward(grad.double())
    xs, ws = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
    out = grouped_mm(xs, ws.transpose(1, 2), ends, grouped=grouped)
    out.backward(grad.to(dtype))
    assert rel(out.detach().double(), ref.detach()) <= tol
    assert rel(xs.grad.double(), x64.grad) <= tol
    assert rel(ws.grad.double(), w64.grad) <= tol


def test_full_activation_checkpointing_keeps_the_aux_loss_gradient(tmp_path):
    from trainer.parallel.checkpointing import apply_activation_checkpointing

    _, folder = hf_folder(tmp_path, "mixtral")
    x = tokens(t=19)
    grads = []
    for mode in ("none", "full"):
        model = load_hf(folder).train()
        apply_activation_checkpointing(model, mode)
        (model(x, labels=labels_of(x)) + model.args.router_aux_loss_coef * model.aux_loss()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        assert rel(grads[1][name], grad) <= 1e-6, name


def moe_run(tmp_path, name, **overrides):
    _, folder = hf_folder(tmp_path, "mixtral", vocab_size=320, router_aux_loss_coef=0.5)
    cfg = tiny_config(
        tmp_path,
        model__from_hf=str(folder),
        model__preset="small",
        model__allow_new_tokenizer=True,
        train__output_dir=str(tmp_path / name),
        train__seq_len=24,
        **overrides,
    )
    return folder, cfg


def test_a_step_records_the_mean_aux_loss_of_its_micro_batches_and_the_expert_load(tmp_path, monkeypatch):
    """Step 1's aux_loss is the mean of transformers' aux_loss over the step's micro-batches (the
    weights before the update); expert_load is max/mean of the experts' tokens per MoE layer."""
    folder, cfg = moe_run(
        tmp_path, "run", train__max_steps=2, train__micro_batch_size=2, train__grad_accum_steps=3, train__log_every=1
    )
    first_step = []
    original = Trainer.forward_backward_step

    def recording(self, batch):
        if not first_step:
            first_step.extend(mb["input_ids"].clone() for mb in batch.to(torch.device("cpu")))
        return original(self, batch)

    monkeypatch.setattr(Trainer, "forward_backward_step", recording)
    Trainer(cfg).train()
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        aux = [hf(x, output_router_logits=True).aux_loss.item() for x in first_step]
    assert len(aux) == 3
    assert records[0]["aux_loss"] == pytest.approx(sum(aux) / 3, rel=1e-5)
    assert len(records[0]["expert_load"]) == 2 and all(x >= 1 for x in records[0]["expert_load"])


def test_no_host_read_between_log_steps_with_experts(tmp_path, monkeypatch):
    counter = CountHostReads(monkeypatch)
    _, cfg = moe_run(tmp_path, "run", train__max_steps=6, train__log_every=3, train__grad_accum_steps=2)
    Trainer(cfg, callbacks=[counter]).train()
    reads = {step: n for step, n in counter.per_step.items() if isinstance(step, int)}
    assert set(reads) == set(range(1, 7)) and all(n == 0 for n in reads.values()), reads
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert all(r["aux_loss"] > 0 and len(r["expert_load"]) == 2 for r in records)


def test_router_jitter_is_refused_in_one_line(tmp_path):
    _, folder = hf_folder(tmp_path, "mixtral", vocab_size=320, router_jitter_noise=0.1)
    overrides = {"model__preset": "small", "model__allow_new_tokenizer": True, "model__from_hf": str(folder)}
    proc = run_cli("train", *tiny_args(tmp_path, **overrides), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "MixtralForCausalLM with router_jitter_noise=0.1 is not supported" in lines[0]
    assert not (tmp_path / "cache").exists()


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_two_ranks_equal_one_process_with_the_aux_loss(tmp_path, strategy):
    """Each rank's micro-batch is one of the one-process run's two micro-batches, so the mean
    load-balancing loss, the gradients and the losses are the same."""
    from tests.helpers import write_corpus
    from tests.test_parallel import _overrides, assert_same_steps, step_records, train_one_process, train_two_ranks

    _, folder = hf_folder(tmp_path, "qwen3_moe", vocab_size=320, router_aux_loss_coef=0.5)
    write_corpus(tmp_path / "corpus")
    common = {"model__from_hf": str(folder), "model__preset": "small", "model__allow_new_tokenizer": "true"}
    train_one_process(_overrides(tmp_path, "one", train__micro_batch_size=2, train__grad_accum_steps=2, **common))
    train_two_ranks(
        _overrides(
            tmp_path,
            strategy,
            train__micro_batch_size=2,
            parallel__strategy=strategy,
            checkpoint__save_every=2,
            **common,
        )
    )
    assert_same_steps(tmp_path / strategy, tmp_path / "one", range(1, 6))
    got, want = step_records(tmp_path / strategy), step_records(tmp_path / "one")
    for step in range(1, 6):
        assert got[step]["aux_loss"] == pytest.approx(want[step]["aux_loss"], rel=1e-5)
        assert got[step]["expert_load"] == pytest.approx(want[step]["expert_load"], rel=1e-4)
    # The 2-rank checkpoint (DCP shards under FSDP) resumed in one process continues with the same losses.
    resumed = "resumed"
    train_one_process(
        _overrides(
            tmp_path,
            resumed,
            train__micro_batch_size=2,
            train__grad_accum_steps=2,
            checkpoint__resume_from=str(tmp_path / strategy / "checkpoint-2"),
            **common,
        )
    )
    assert_same_steps(tmp_path / resumed, tmp_path / "one", range(3, 6))


@pytest.mark.distributed
def test_expert_parallel_on_two_ranks_equals_one_process_and_resumes(tmp_path):
    """parallel.expert_parallel=2 with FSDP2: each rank holds 2 of the 4 experts; the one-process
    losses, gradient norms and load-balancing figures; its checkpoint resumes in one process."""
    from tests.helpers import write_corpus
    from tests.test_parallel import _overrides, assert_same_steps, step_records, torchrun, train_one_process

    _, folder = hf_folder(tmp_path, "mixtral", vocab_size=320, num_local_experts=4, router_aux_loss_coef=0.5)
    write_corpus(tmp_path / "corpus")
    common = {"model__from_hf": str(folder), "model__preset": "small", "model__allow_new_tokenizer": "true"}
    train_one_process(_overrides(tmp_path, "one", train__micro_batch_size=2, train__grad_accum_steps=2, **common))
    ep = torchrun(
        [
            "-m",
            "trainer",
            "train",
            *_overrides(
                tmp_path,
                "ep",
                train__micro_batch_size=2,
                parallel__strategy="fsdp",
                parallel__expert_parallel=2,
                checkpoint__save_every=2,
                **common,
            ),
        ]
    )
    assert ep.returncode == 0, (ep.stdout + ep.stderr)[-3000:]
    assert "each of the 2 ranks holds 2 of the 4 experts of each MoE layer" in ep.stdout + ep.stderr
    assert_same_steps(tmp_path / "ep", tmp_path / "one", range(1, 6))
    got, want = step_records(tmp_path / "ep"), step_records(tmp_path / "one")
    for step in range(1, 6):
        assert got[step]["aux_loss"] == pytest.approx(want[step]["aux_loss"], rel=1e-5)
        assert got[step]["expert_load"] == pytest.approx(want[step]["expert_load"], rel=1e-4)
    train_one_process(
        _overrides(
            tmp_path,
            "resumed",
            train__micro_batch_size=2,
            train__grad_accum_steps=2,
            checkpoint__resume_from=str(tmp_path / "ep" / "checkpoint-2"),
            **common,
        )
    )
    assert_same_steps(tmp_path / "resumed", tmp_path / "one", range(3, 6))
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ep" / "final")  # the gathered export
    assert back.config.num_local_experts == 4


@pytest.mark.parametrize(
    "degree, experts, message",
    [
        (3, 4, "parallel.expert_parallel=3 must equal the number of ranks (1) for now"),
        (2, 0, "parallel.expert_parallel=2 needs a mixture-of-experts model; this one has none"),
    ],
)
def test_expert_parallel_that_cannot_split_is_one_line(degree, experts, message):
    from trainer.errors import ConfigError
    from trainer.parallel.expert_parallel import check_expert_parallel

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_expert_parallel(degree, experts, 1)


def test_expert_parallel_must_divide_the_experts():
    from trainer.errors import ConfigError
    from trainer.parallel.expert_parallel import check_expert_parallel

    with pytest.raises(ConfigError, match="does not divide the model's 6 experts; choose one of 1, 2, 3, 6"):
        check_expert_parallel(4, 6, 4)


@pytest.mark.slow
def test_mixtral_compiled_and_checkpointed_equals_eager(tmp_path):
    """The MoE block (router, top-k, sort, grouped matmuls, index_add, the routing figures kept for
    the loss) under torch.compile and selective checkpointing: the eager losses and aux losses."""
    from tests.test_families import family_run

    _, folder = hf_folder(tmp_path, "mixtral", vocab_size=320, num_hidden_layers=1, router_aux_loss_coef=0.5)
    eager = family_run(tmp_path, folder, "eager")
    torch._dynamo.reset()
    compiled = family_run(
        tmp_path, folder, "compiled", parallel__compile=True, parallel__activation_checkpointing="selective"
    )
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    assert [compiled[s] for s in sorted(compiled)] == pytest.approx([eager[s] for s in sorted(eager)], rel=1e-5)
    aux = {
        name: [r["aux_loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r]
        for name in ("eager", "compiled")
    }
    assert aux["compiled"] == pytest.approx(aux["eager"], rel=1e-5)


# ---------------------------------------------------------------- LoRA on the experts


@pytest.mark.parametrize(
    "family, target_parameters, written",
    [
        ("mixtral", "experts", ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]),
        ("qwen3_moe", "gate_up_proj", ["mlp.experts.gate_up_proj"]),  # one weight: no nesting in PEFT's keys
        ("mixtral", r"layers\.1\..*down_proj", ["model.layers.1.mlp.experts.down_proj"]),
    ],
)
def test_peft_loads_expert_adapters_and_merges_to_our_merged_model(tmp_path, family, target_parameters, written):
    """Per-expert adapters on the stacked expert weights, saved in PEFT's target_parameters format:
    PEFT's model gives our logits, and its merge our merged model's."""
    import peft

    from tests.test_lora import perturb_adapters, settings
    from trainer import lora
    from trainer.models import save_hf

    _, base = hf_folder(tmp_path, family)
    model = load_hf(base)
    lora.apply_lora(model, settings(target="q_proj", target_parameters=target_parameters))
    perturb_adapters(model)
    model.eval()
    x = tokens()
    with torch.no_grad():
        ours = model(x)
    lora.save_adapter(model, tmp_path / "adapter", base)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] == written and config["target_modules"] == ["q_proj"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        base_logits = hf(x).logits
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # a missing adapter key would only warn
            peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
        assert rel(peft_model(x).logits, ours) <= 1e-5
        peft_merged = peft_model.merge_and_unload()(x).logits
    assert rel(peft_merged, base_logits) > 1e-3  # the adapters changed the model
    save_hf(lora.merged_model(model), tmp_path / "merged")
    with torch.no_grad():
        ours_merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(x).logits
    assert rel(ours_merged, peft_merged) <= 1e-5
    reloaded = lora.load_adapter_model(tmp_path / "adapter")
    with torch.no_grad():
        assert rel(reloaded(x), ours) <= 1e-6


def test_expert_adapters_against_an_fp64_reference():
    """ExpertLora's grouped path: each expert's rows times W_e + s B_e A_e, forward and backward."""
    from trainer.lora import ExpertLora

    g = torch.Generator().manual_seed(3)
    experts, out_features, in_features, rank = 3, 24, 16, 4
    weight = torch.randn(experts, out_features, in_features, generator=g)
    adapter = ExpertLora(weight, rank, alpha=8.0)
    with torch.no_grad():
        adapter.lora_B.normal_(generator=g)
    sizes = [5, 0, 7]
    ends = torch.cumsum(torch.tensor(sizes), 0)
    x = torch.randn(sum(sizes), in_features, generator=g, requires_grad=True)
    out = adapter(x, ends)
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad)
    a64 = adapter.lora_A.detach().double().requires_grad_()
    b64 = adapter.lora_B.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    a_e = a64.view(experts, rank, in_features)
    b_e = b64.view(out_features, rank, experts).permute(2, 0, 1)
    rows, start = [], 0
    for e, n in enumerate(sizes):
        rows.append(x64[start : start + n] @ (b_e[e] @ a_e[e]).T * 2.0)
        start += n
    ref = torch.cat(rows)
    ref.backward(grad.double())
    assert rel(out.detach(), ref.detach()) <= 1e-6
    assert rel(x.grad, x64.grad) <= 1e-6
    assert rel(adapter.lora_A.grad, a64.grad) <= 1e-6 and rel(adapter.lora_B.grad, b64.grad) <= 1e-6


@pytest.mark.slow
def test_a_lora_run_on_the_experts_trains_resumes_and_writes_an_adapter_peft_loads(tmp_path):
    """lora.target_parameters=experts from model.from_hf: only the adapters train, the run resumes
    exactly, and PEFT loads final/'s adapter."""
    import peft

    from tests.test_families import family_run

    hf, folder = hf_folder(tmp_path, "mixtral", vocab_size=320)
    extra = dict(lora__rank=4, lora__target="self_attn", lora__target_parameters="experts")
    full = family_run(tmp_path, folder, "run", **extra)
    assert len(full) == 4 and full[4] < full[1]
    (tmp_path / "run" / "checkpoint-4").rename(tmp_path / "run" / "later")
    resumed = family_run(
        tmp_path, folder, "run", checkpoint__resume_from=str(tmp_path / "run" / "checkpoint-2"), **extra
    )
    assert [resumed[s] for s in (3, 4)] == pytest.approx([full[s] for s in (3, 4)], rel=1e-6)
    adapter = peft.PeftModel.from_pretrained(hf, tmp_path / "run" / "final")
    changed = [n for n, p in adapter.named_parameters() if "experts" in n and "lora_B" in n and p.abs().sum() > 0]
    assert changed  # the trained expert adapters arrived


def test_expert_adapters_refuse_dropout_in_one_line(tmp_path):
    from trainer.config import load_config
    from trainer.errors import ConfigError

    with pytest.raises(ConfigError, match="takes no lora.dropout"):
        load_config(None, ["--lora.rank=4", "--lora.target_parameters=experts", "--lora.dropout=0.1"])
