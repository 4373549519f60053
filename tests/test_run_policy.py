"""What a run may touch, what it resumes, and when callbacks' requests take effect."""

import json
import warnings

import pytest

from tests.helpers import StopAt, tiny_config
from trainer import Trainer
from trainer.callbacks import TrainerCallback
from trainer.checkpoint import latest_checkpoint
from trainer.errors import CheckpointError, ConfigError
from trainer.metrics import read_metrics
from trainer.models import save_hf


def truncate(file, keep: float = 0.5):
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


def finished_run(tmp_path, **overrides):
    values = dict(train__max_steps=4, checkpoint__save_every=2, checkpoint__keep_last=0)
    values.update(overrides)
    Trainer(tiny_config(tmp_path, **values)).train()
    return tmp_path / "run"


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- nothing lost before the run is checked


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model__from_hf": "FILE"}, "is not a folder"),
        ({"data__path": "/no/such/corpus"}, "matched no files"),
        ({"train__seq_len": 100000}, "longer than the model allows"),
        ({"model__vocab_size": 64}, "the tokenizer has 257 tokens"),
    ],
)
def test_a_run_that_cannot_start_leaves_the_previous_run_untouched(tmp_path, overrides, message):
    run = finished_run(tmp_path)
    before = snapshot(run)
    if overrides.get("model__from_hf") == "FILE":
        (tmp_path / "model.safetensors").write_text("not a folder")
        overrides = {"model__from_hf": str(tmp_path / "model.safetensors")}
    with pytest.raises(Exception, match=message):
        Trainer(tiny_config(tmp_path, train__overwrite=True, **overrides)).train()
    assert snapshot(run) == before


def test_overwrite_replaces_the_previous_run_once_the_new_one_starts(tmp_path):
    run = finished_run(tmp_path)
    Trainer(tiny_config(tmp_path, train__max_steps=3, train__overwrite=True, train__seed=1)).train()
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-3"]


def test_an_output_folder_that_cannot_be_written_is_one_clear_error(tmp_path):
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(ConfigError, match="train.output_dir=.*is a file, not a folder"):
        Trainer(tiny_config(tmp_path, train__output_dir=str(tmp_path / "taken"))).train()
    with pytest.raises(ConfigError, match="cannot be created: .*taken' is a file"):
        Trainer(tiny_config(tmp_path, train__output_dir=str(tmp_path / "taken" / "run"))).train()


# ---------------------------------------------------------------- damaged checkpoints


def test_a_damaged_checkpoint_named_explicitly_names_the_file_and_the_newest_loadable_one(tmp_path):
    run = finished_run(tmp_path)
    truncate(run / "checkpoint-4" / "model.safetensors")
    with pytest.raises(CheckpointError) as error:
        Trainer(tiny_config(tmp_path, train__max_steps=6, checkpoint__resume_from=str(run / "checkpoint-4"))).train()
    message = str(error.value)
    assert "checkpoint-4/model.safetensors is damaged" in message and "checkpoint-2 instead" in message
    assert "\n" not in message


@pytest.mark.parametrize("damage", ["truncate-weights", "truncate-state", "delete-state", "garbage-json"])
def test_resume_latest_skips_a_damaged_newest_checkpoint(tmp_path, damage):
    run = finished_run(tmp_path)
    newest = run / "checkpoint-4"
    if damage == "truncate-weights":
        truncate(newest / "model.safetensors")
    elif damage == "truncate-state":
        truncate(newest / "training_state.pt", keep=0.9)
    elif damage == "delete-state":
        (newest / "training_state.pt").unlink()
    else:
        (newest / "trainer_state.json").write_text("{not json")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = Trainer(
            tiny_config(
                tmp_path,
                train__max_steps=6,
                checkpoint__save_every=2,
                checkpoint__keep_last=0,
                checkpoint__resume_from="latest",
            )
        ).train()
    assert any("skipping" in str(w.message) and "checkpoint-4" in str(w.message) for w in caught)
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert state.step == 6 and steps == [1, 2, 3, 4, 5, 6]  # steps 3-4 trained again from checkpoint-2


# ---------------------------------------------------------------- resume edges


def test_resuming_at_or_past_max_steps_is_refused_and_rewrites_nothing(tmp_path):
    run = finished_run(tmp_path)
    before = snapshot(run)
    with pytest.raises(ConfigError, match="checkpoint-4 is at step 4.*raise train.max_steps"):
        Trainer(tiny_config(tmp_path, train__max_steps=3, checkpoint__resume_from="latest")).train()
    assert snapshot(run) == before


def test_a_resumed_run_summary_counts_its_own_steps_and_keeps_the_starting_eval(tmp_path, capsys):
    Trainer(tiny_config(tmp_path, train__max_steps=6, checkpoint__save_every=2), callbacks=[StopAt(4)]).train()
    capsys.readouterr()
    Trainer(
        tiny_config(tmp_path, train__max_steps=6, checkpoint__save_every=2, checkpoint__resume_from="latest")
    ).train()
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "run" / "train_results.json").read_text())
    assert results["steps_this_run"] == 2 and results["tokens_this_run"] == 2 * 2 * 32
    assert results["tokens_seen"] == 6 * 2 * 32
    assert "for 2 steps (resumed at step 4) (128 label tokens)" in out
    assert results["initial_eval_loss"] is not None  # the step-0 evaluation survives the resume


def test_a_warmup_longer_than_the_run_is_shortened_and_said(tmp_path, capsys):
    trainer = Trainer(tiny_config(tmp_path, train__max_steps=10, optim__warmup_steps=50))
    trainer.train()
    assert "optim.warmup_steps=50 is not below train.max_steps=10; warming up over 1 steps" in capsys.readouterr().out
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "lr" in r]
    assert lrs[1] == max(lrs)  # the peak is reached after one warm-up step, not at the end
    assert "warmup_steps = 1" in (tmp_path / "run" / "config.toml").read_text()


# ---------------------------------------------------------------- fine-tuning mismatches


@pytest.fixture
def pretrained(tmp_path):
    from trainer.models import build

    folder = tmp_path / "pretrained"
    save_hf(build("tiny", vocab_size=320), folder)
    return folder


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model__n_layers": 3}, "model.n_layers does not apply with model.from_hf"),
        ({"model__preset": "tiny"}, "model.preset does not apply with model.from_hf.*; remove it$"),
        (
            {"model__preset": "tiny", "model__n_layers": 3, "model__n_heads": 2},
            "model.preset, model.n_layers and model.n_heads do not apply with model.from_hf.*; remove them$",
        ),
        ({}, "a new BPE tokenizer would be trained"),
        ({"data__tokenizer": "byte"}, "data.tokenizer=byte pairs the pretrained embeddings"),
    ],
)
def test_fine_tuning_refuses_settings_that_would_be_ignored_or_mismatched(tmp_path, pretrained, overrides, message):
    values = {"model__from_hf": str(pretrained), "data__tokenizer": "bpe", "model__preset": "small", **overrides}
    with pytest.raises(ConfigError, match=message):
        Trainer(tiny_config(tmp_path, **values)).train()
    assert not (tmp_path / "run").exists()


def test_a_new_tokenizer_for_a_pretrained_model_when_asked_explicitly(tmp_path, pretrained):
    state = Trainer(
        tiny_config(
            tmp_path,
            model__from_hf=str(pretrained),
            model__preset="small",
            model__allow_new_tokenizer=True,
            train__max_steps=2,
        )
    ).train()
    assert state.step == 2


# ---------------------------------------------------------------- callbacks take effect in the same step


class StopWhenEvaluated(TrainerCallback):
    def on_evaluate(self, config, state, control, metrics=None, **kwargs):
        control.should_training_stop = state.step >= 4


def test_a_stop_asked_for_in_on_evaluate_stops_at_that_step(tmp_path):
    state = Trainer(
        tiny_config(tmp_path, train__max_steps=20, train__eval_every=2), callbacks=[StopWhenEvaluated()]
    ).train()
    run = tmp_path / "run"
    assert state.step == 4
    assert latest_checkpoint(run).name == "checkpoint-4"
    results = json.loads((run / "train_results.json").read_text())
    evals = [r for r in read_metrics(run / "metrics.jsonl") if "eval_loss" in r]
    assert results["steps"] == 4 and evals[-1]["step"] == 4 and results["eval_loss"] == evals[-1]["eval_loss"]


def test_a_label_outside_the_vocabulary_stops_the_run_with_one_line(tmp_path):
    from trainer import build_run

    cfg = tiny_config(tmp_path, train__max_steps=4)
    parts = build_run(cfg)

    class BadLabelOnStepTwo:
        def __init__(self, loader):
            self.loader, self.steps = loader, 0

        def __getattr__(self, name):
            return getattr(self.loader, name)

        def next_step(self):
            micro_batches, self.steps = self.loader.next_step(), self.steps + 1
            if self.steps == 2:
                micro_batches[0]["labels"][1, 17] = 70000
            return micro_batches

    parts.loader = BadLabelOnStepTwo(parts.loader)
    with pytest.raises(ConfigError) as error:
        Trainer(cfg, parts=parts).train()
    message = str(error.value)
    assert message.startswith("label 70000 at position (1, 17) is outside the vocabulary [0, ")
    assert "\n" not in message and not (tmp_path / "run" / "final").exists()


def test_from_hf_without_config_json_is_refused_before_the_data_is_read(tmp_path, caplog):
    (tmp_path / "not_a_model").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        Trainer(
            tiny_config(
                tmp_path,
                model__from_hf=str(tmp_path / "not_a_model"),
                model__preset="small",
                model__allow_new_tokenizer=True,
            )
        ).train()
    assert not (tmp_path / "cache").exists()  # nothing was tokenized


def test_micro_batch_size_auto_picks_what_the_planner_fits_and_saves_it(tmp_path, capsys):
    from trainer.config import load_config
    from trainer.plan import choose_micro_batch, predict_peak

    budget = 400 * 2**20
    cfg = tiny_config(
        tmp_path,
        train__micro_batch_size="auto",
        train__global_batch_size=12,
        train__memory_budget=budget,
        train__max_steps=2,
    )
    expected = choose_micro_batch(cfg, budget, 1)
    Trainer(cfg).train()
    saved = load_config(tmp_path / "run" / "config.toml")
    assert (saved.train.micro_batch_size, saved.train.grad_accum_steps) == expected[:2]
    assert saved.train.micro_batch_size * saved.train.grad_accum_steps >= 12
    assert predict_peak(saved).required_bytes <= budget
    assert "micro_batch_size=auto" in capsys.readouterr().out


def test_micro_batch_size_takes_auto_or_a_positive_integer(tmp_path):
    assert tiny_config(tmp_path, train__micro_batch_size="auto").train.micro_batch_size == "auto"
    with pytest.raises(ConfigError, match="train.micro_batch_size='many' is not valid: expected an integer"):
        tiny_config(tmp_path, train__micro_batch_size="many")


def test_a_tokenizer_that_maps_text_to_the_models_own_ids_is_the_models_own(tmp_path, pretrained):
    from trainer.data import ByteTokenizer

    ByteTokenizer().save(str(pretrained))  # the pretrained folder's own tokenizer is the byte tokenizer
    state = Trainer(
        tiny_config(
            tmp_path, model__from_hf=str(pretrained), model__preset="small", data__tokenizer="byte", train__max_steps=1
        )
    ).train()
    assert state.step == 1


def test_bf16_on_a_gpu_without_it_falls_back_to_fp16_with_a_warning(monkeypatch):
    import torch

    from trainer.runtime import resolve_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.warns(UserWarning, match="Tesla T4 has no bf16: computing in fp16"):
        assert resolve_dtype("bf16", torch.device("cuda")) == torch.float16
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_dtype("bf16", torch.device("cuda")) == torch.bfloat16


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_earlier_checkpoint(tmp_path, monkeypatch):
    import errno

    import torch

    import trainer.checkpoint as checkpoint

    real_save, saves = torch.save, []

    def save_until_the_disk_fills(obj, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save_until_the_disk_fills)
    with pytest.raises(CheckpointError) as error:
        Trainer(tiny_config(tmp_path, train__max_steps=6, checkpoint__save_every=2)).train()
    message = str(error.value)
    assert "could not write checkpoint-4" in message and "No space left on device" in message
    assert "checkpoint-2" in message and "\n" not in message
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
