"""The model card of final/ and each checkpoint: the hub's own parser reads it, and it says what the run did."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import ModelCard, metadata_load

from tests.helpers import tiny_config
from trainer import Trainer
from trainer.model_card import card_metadata, hub_id


def test_hub_id_of_a_downloaded_model_folder():
    path = "/home/me/.cache/huggingface/hub/models--meta-llama--Llama-3.2-1B/snapshots/4e20de362430cd3b72f3/"
    assert hub_id(path) == "meta-llama/Llama-3.2-1B"
    assert hub_id("/models/llama-1b") is None


def test_card_metadata_reads_the_yaml_block_only():
    assert card_metadata("---\nlicense: mit\ntags:\n- a\n---\n# title\n") == {"license": "mit", "tags": ["a"]}
    assert card_metadata("# no metadata\n") == {}


def test_final_and_each_checkpoint_have_a_card_the_hub_reads(tmp_path):
    Trainer(tiny_config(tmp_path, train__max_steps=4, train__eval_every=2, checkpoint__save_every=2)).train()
    run = tmp_path / "run"
    results = json.loads((run / "train_results.json").read_text())

    card = ModelCard.load(run / "final" / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert "kernel-trainer" in meta["tags"] and "base_model" not in meta and "license" not in meta
    assert meta["datasets"] == [str(tmp_path / "corpus")]
    assert card.text.startswith("\n# run\n")
    assert f"| eval loss (step 4) | {results['eval_loss']:.4f} |" in card.text
    assert f"| eval perplexity (step 4) | {results['perplexity']:.2f} |" in card.text
    assert f"| label tokens seen | {results['tokens_seen']:,} |" in card.text
    assert "2 sequences x 1 accumulation x 1 rank(s) of 32 tokens = 64 tokens per step" in card.text
    assert "Trained on 1 x CPU" in card.text and "fp32 compute" in card.text
    assert f'AutoModelForCausalLM.from_pretrained("{run / "final"}")' in card.text

    early = (run / "checkpoint-2" / "README.md").read_text()
    assert metadata_load(run / "checkpoint-2" / "README.md")["library_name"] == "transformers"
    assert early.count("# run (checkpoint-2)") == 1 and "| eval loss (step 2) |" in early
    assert "2 of 4 steps" in early


@pytest.mark.slow
def test_an_adapter_card_names_its_base_and_license_and_loads_as_it_says(tmp_path):
    from peft import AutoPeftModelForCausalLM

    from trainer.models import build, save_hf

    base = tmp_path / "base"
    save_hf(build("tiny", vocab_size=320, seed=3), base)
    (base / "README.md").write_text("---\nlicense: other\nlicense_name: tiny-license\n---\n# a base model\n")
    cfg = tiny_config(
        tmp_path,
        model__from_hf=str(base),
        model__preset="small",
        model__allow_new_tokenizer=True,
        lora__rank=4,
        train__max_steps=2,
    )
    Trainer(cfg).train()
    final = tmp_path / "run" / "final"

    card = ModelCard.load(final / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "peft" and meta["base_model"] == str(base)
    assert meta["license"] == "other" and meta["license_name"] == "tiny-license"
    assert "lora" in meta["tags"]
    assert "A LoRA adapter (rank 4) for" in card.text and "| LoRA | rank 4, alpha 16" in card.text
    assert f'AutoPeftModelForCausalLM.from_pretrained("{final}")' in card.text
    assert f"`{final / 'merged'}` holds base and adapter merged" in card.text
    model = AutoPeftModelForCausalLM.from_pretrained(str(final))  # as the card says
    assert model.peft_config["default"].r == 4
