"""The model folders a run writes (final/, checkpoints, LoRA's merged/) as others read them: transformers
finds the tokenizer's special tokens and stops generating at its EOS, and every file follows the umask."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_config
from trainer import Trainer
from trainer.data import load_tokenizer
from trainer.models import build, save_hf


@pytest.fixture
def umask_002():
    """A umask under which group members may write (0o664 files): not what any library hard-codes."""
    old = os.umask(0o002)
    yield 0o002
    os.umask(old)


def only_eos(eos_id: int):
    """A transformers logits processor that makes EOS the only possible next token."""
    from transformers import LogitsProcessor

    class OnlyEos(LogitsProcessor):
        def __call__(self, input_ids, scores):
            forced = torch.full_like(scores, -float("inf"))
            forced[:, eos_id] = 0.0
            return forced

    return OnlyEos()


def generated_length(folder: Path, eos_id: int) -> int:
    """New tokens transformers' generate makes from `folder` when every step can only pick EOS."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    prompt = torch.tensor([[5, 6, 7]])
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, logits_processor=[only_eos(eos_id)])
    return out.shape[1] - prompt.shape[1]


def train_lora(tmp_path: Path, base: Path) -> None:
    """Two LoRA steps on `base` with the byte tokenizer, into tmp_path / "run"."""
    cfg = tiny_config(
        tmp_path,
        model__from_hf=str(base),
        model__preset="small",
        model__allow_new_tokenizer=True,
        lora__rank=4,
        train__max_steps=2,
    )
    Trainer(cfg).train()


def test_a_scratch_run_writes_the_tokenizers_special_tokens_so_generate_stops_at_its_eos(tmp_path):
    from transformers import AutoConfig, GenerationConfig

    # A BPE tokenizer trained on the corpus puts EOS at id 0: Llama's defaults (eos 2, bos 1) are text there.
    cfg = tiny_config(tmp_path, data__tokenizer="bpe", data__vocab_size=300, checkpoint__save_every=2)
    Trainer(cfg).train()
    run = tmp_path / "run"
    eos = load_tokenizer(str(run / "final")).eos_id
    assert eos == 0
    for folder in (run / "final", run / "checkpoint-2"):
        config = AutoConfig.from_pretrained(folder)
        assert (config.eos_token_id, config.bos_token_id) == (eos, None)
        generation = GenerationConfig.from_pretrained(folder)
        assert (generation.eos_token_id, generation.pad_token_id) == (eos, eos)
    assert generated_length(run / "final", eos) == 1


def test_a_lora_runs_merged_model_stops_at_the_tokenizers_eos_and_keeps_the_bases_generation_defaults(tmp_path):
    from transformers import GenerationConfig

    base = tmp_path / "base"
    save_hf(build("tiny", vocab_size=320, seed=3), base)
    # The base's own sampling defaults, and token ids of another tokenizer that the run's must replace.
    (base / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "eos_token_id": 2}))
    train_lora(tmp_path, base)
    merged = tmp_path / "run" / "final" / "merged"
    generation = GenerationConfig.from_pretrained(merged)
    assert (generation.eos_token_id, generation.temperature) == (256, 0.7)  # the byte tokenizer's EOS
    assert json.loads((merged / "config.json").read_text())["eos_token_id"] == 256
    assert generated_length(merged, 256) == 1


def test_an_instruct_models_several_end_tokens_stay_when_they_hold_the_tokenizers_eos(tmp_path):
    from trainer.models.hf import with_token_ids

    source = {"eos_token_id": [7, 9], "bos_token_id": 1}
    kept = with_token_ids(source, {"bos_token_id": None, "eos_token_id": 9, "pad_token_id": None})
    assert kept == {"eos_token_id": [7, 9], "bos_token_id": 1, "pad_token_id": None}
    replaced = with_token_ids(source, {"bos_token_id": 4, "eos_token_id": 3, "pad_token_id": 5})
    assert replaced == {"eos_token_id": 3, "bos_token_id": 4, "pad_token_id": 5}


def modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mode & 0o777 for p in [folder, *folder.rglob("*")]}


def wrong_modes(folder: Path, mask: int) -> dict[str, str]:
    return {
        name: oct(mode)
        for name, mode in modes(folder).items()
        if mode != ((0o777 if (folder / name).is_dir() else 0o666) & ~mask)
    }


def test_every_file_of_a_run_and_its_cache_follows_the_umask(tmp_path, umask_002):
    cfg = tiny_config(tmp_path, data__tokenizer="bpe", data__vocab_size=300, checkpoint__save_every=2)
    Trainer(cfg).train()
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert wrong_modes(tmp_path / "run", umask_002) == {}
    assert wrong_modes(tmp_path / "cache", umask_002) == {}


def test_a_lora_runs_adapter_and_merged_weights_follow_the_umask(tmp_path, umask_002):
    base = tmp_path / "base"
    save_hf(build("tiny", vocab_size=320, seed=3), base)
    train_lora(tmp_path, base)
    final = tmp_path / "run" / "final"
    assert (final / "adapter_model.safetensors").is_file() and (final / "merged" / "model.safetensors").is_file()
    assert wrong_modes(tmp_path / "run", umask_002) == {}
    assert wrong_modes(base, umask_002) == {}  # save_hf itself
