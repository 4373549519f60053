import json
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import StopAt, tiny_config
from trainer import Trainer
from trainer.checkpoint import latest_checkpoint, load_checkpoint, rotate_checkpoints
from trainer.errors import CheckpointError, TrainerError
from trainer.metrics import read_metrics
from trainer.models import build


def losses(run_dir):
    return [(r["step"], r.get("loss", r.get("eval_loss"))) for r in read_metrics(run_dir / "metrics.jsonl")]


def test_resume_reproduces_the_uninterrupted_losses_exactly(tmp_path):
    common = dict(train__max_steps=7, checkpoint__save_every=3, train__eval_every=2, train__grad_accum_steps=2)
    Trainer(tiny_config(tmp_path, train__output_dir=str(tmp_path / "a"), **common)).train()
    Trainer(tiny_config(tmp_path, train__output_dir=str(tmp_path / "b"), **common), callbacks=[StopAt(4)]).train()
    assert latest_checkpoint(tmp_path / "b").name == "checkpoint-4"
    state = Trainer(
        tiny_config(tmp_path, train__output_dir=str(tmp_path / "b"), checkpoint__resume_from="latest", **common)
    ).train()
    assert state.step == 7
    assert losses(tmp_path / "a") == losses(tmp_path / "b")  # exact, not approximate


def test_kill_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    cfg = tiny_config(tmp_path, train__max_steps=4, checkpoint__save_every=2)
    script = textwrap.dedent(f"""
        import os, torch
        import trainer.checkpoint as ck
        from trainer import Trainer, load_config
        real_save = torch.save
        def dying_save(obj, path, *a, **k):
            if "checkpoint-4" in str(path):
                real_save(obj, path, *a, **k)
                os._exit(9)  # the process dies half way through writing checkpoint-4
            real_save(obj, path, *a, **k)
        ck.torch.save = dying_save
        Trainer(load_config({str(tmp_path / "run" / "config.toml")!r})).train()
    """)
    (tmp_path / "run").mkdir()
    from trainer.config import to_toml

    (tmp_path / "run" / "config.toml").write_text(to_toml(cfg))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 9, proc.stderr
    run = tmp_path / "run"
    assert any(p.name.startswith(".tmp-checkpoint-4") for p in run.iterdir())
    assert latest_checkpoint(run).name == "checkpoint-2"
    model = build("tiny", vocab_size=257)
    saved = load_checkpoint(run / "checkpoint-2", model=model)
    assert saved["trainer"]["step"] == 2
    state = Trainer(tiny_config(tmp_path, train__max_steps=4, checkpoint__resume_from="latest")).train()
    assert state.step == 4 and latest_checkpoint(run).name == "checkpoint-4"


def test_checkpoint_of_another_shape_is_refused(tmp_path):
    Trainer(tiny_config(tmp_path, train__max_steps=2)).train()
    other = build("tiny", vocab_size=257)
    wider = build(other.args.__class__(**{**other.args.to_dict(), "intermediate_size": 200}))
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight is \(\d+, \d+\) there but \(\d+, \d+\) here"):
        load_checkpoint(tmp_path / "run" / "checkpoint-2", model=wider)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        Trainer(tiny_config(tmp_path, train__max_steps=4, model__n_layers=3, checkpoint__resume_from="latest")).train()


def test_new_run_into_folder_with_checkpoints_is_refused_unless_overwrite(tmp_path):
    Trainer(tiny_config(tmp_path, train__max_steps=2)).train()
    before = (tmp_path / "run" / "checkpoint-2" / "model.safetensors").read_bytes()
    with pytest.raises(TrainerError, match="already holds a run's checkpoints.*resume_from=latest.*overwrite=true"):
        Trainer(tiny_config(tmp_path, train__max_steps=2, train__seed=1)).train()
    assert (tmp_path / "run" / "checkpoint-2" / "model.safetensors").read_bytes() == before
    Trainer(tiny_config(tmp_path, train__max_steps=3, train__seed=1, train__overwrite=True)).train()
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-3"]
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r] == [1, 2, 3]


def test_resume_latest_without_checkpoint_starts_fresh_and_says_so(tmp_path, capsys):
    state = Trainer(tiny_config(tmp_path, train__max_steps=2, checkpoint__resume_from="latest")).train()
    assert state.step == 2
    assert "no checkpoint" in capsys.readouterr().out


def _fake_checkpoint(folder, step):
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"trainer": {"step": step}}))
    return path


def test_rotation_keeps_the_last_n_and_never_the_best(tmp_path):
    for step in (1, 2, 3, 4, 5):
        _fake_checkpoint(tmp_path, step)
    (tmp_path / "checkpoint-6").mkdir()  # incomplete: no trainer_state.json, ignored by rotation and resume
    rotate_checkpoints(tmp_path, keep_last=2, protect=str(tmp_path / "checkpoint-2"))
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-5",
        "checkpoint-6",
    ]
    assert latest_checkpoint(tmp_path).name == "checkpoint-5"
    rotate_checkpoints(tmp_path, keep_last=0, protect=None)  # 0 keeps all
    assert latest_checkpoint(tmp_path).name == "checkpoint-5"


def test_best_checkpoint_survives_rotation_in_a_run(tmp_path):
    trainer = Trainer(
        tiny_config(
            tmp_path, train__max_steps=6, train__eval_every=2, checkpoint__save_every=2, checkpoint__keep_last=1
        )
    )
    real_evaluate = Trainer.evaluate

    def evaluate(self):  # fakes a rising eval loss after step 2
        metrics = real_evaluate(self)
        if metrics is not None and self.state.step > 2:
            metrics["eval_loss"] = 100.0 + self.state.step
        return metrics

    trainer.evaluate = evaluate.__get__(trainer)
    state = trainer.train()
    names = sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*"))
    assert names == ["checkpoint-2", "checkpoint-6"]
    assert state.best_checkpoint.endswith("checkpoint-2")


# ---------------------------------------------------------------- checkpoint.async_save


def test_async_saves_resume_to_the_uninterrupted_losses_exactly(tmp_path):
    """Checkpoints written by a thread while training goes on hold their own step's state: the
    run resumed from the step-4 one continues with the losses of a run never stopped."""
    common = dict(train__max_steps=7, checkpoint__save_every=2, train__eval_every=2, train__grad_accum_steps=2)
    Trainer(tiny_config(tmp_path, train__output_dir=str(tmp_path / "a"), **common)).train()
    Trainer(tiny_config(tmp_path, train__output_dir=str(tmp_path / "b"), checkpoint__async_save=True, **common)).train()
    run = tmp_path / "b"
    assert [p.name for p in sorted(run.glob("checkpoint-*"))] == ["checkpoint-4", "checkpoint-6", "checkpoint-7"]
    assert not list(run.glob(".tmp-*"))  # every background save finished before train() returned
    (run / "checkpoint-6").rename(run / "later-6")
    (run / "checkpoint-7").rename(run / "later-7")
    Trainer(tiny_config(tmp_path, train__output_dir=str(run), checkpoint__resume_from="latest", **common)).train()
    # the resumed run drops the records past step 4 from metrics.jsonl and logs them again
    assert losses(run) == losses(tmp_path / "a")  # exact, not approximate


def test_an_async_save_writes_the_state_of_its_own_step(tmp_path):
    """The weights and optimizer state are copied when save() returns: changing them right after
    does not reach the checkpoint the thread is still writing."""
    import torch
    from safetensors.torch import load_file

    from trainer.build import build_run
    from trainer.config import load_config, to_toml

    cfg = tiny_config(tmp_path, checkpoint__async_save=True)
    (tmp_path / "c.toml").write_text(to_toml(cfg))
    parts = build_run(load_config(str(tmp_path / "c.toml")))
    model, optimizer = parts.model, parts.optimizer
    model(torch.randint(0, 200, (2, 16)), labels=torch.randint(0, 200, (2, 16))).backward()
    optimizer.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moment = next(iter(optimizer.state.values()))["exp_avg"].clone()
    path = parts.checkpointer.save(
        1,
        model=model,
        optimizer=optimizer,
        scheduler=parts.scheduler,
        scaler=None,
        trainer_state={"step": 1},
        sampler_state={},
    )
    with torch.no_grad():  # what the next step would do, at once
        for p in model.parameters():
            p.add_(1.0)
        for state in optimizer.state.values():
            state["exp_avg"].add_(1.0)
    parts.checkpointer.wait()
    saved = load_file(path / "model.safetensors")
    for name, tensor in saved.items():
        assert torch.equal(tensor, before[name]), name
    written = torch.load(path / "training_state.pt", weights_only=False)
    assert torch.equal(next(iter(written["optimizer"]["state"].values()))["exp_avg"], moment)


def test_kill_during_an_async_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    cfg = tiny_config(tmp_path, train__max_steps=6, checkpoint__save_every=2, checkpoint__async_save=True)
    script = textwrap.dedent(f"""
        import os, time, torch
        import trainer.checkpoint as ck
        from trainer import Trainer, load_config
        real_save = torch.save
        def dying_save(obj, path, *a, **k):
            real_save(obj, path, *a, **k)
            if "checkpoint-4" in str(path):
                os._exit(9)  # the process dies while the thread writes checkpoint-4
        ck.torch.save = dying_save
        Trainer(load_config({str(tmp_path / "run" / "config.toml")!r})).train()
    """)
    (tmp_path / "run").mkdir()
    from trainer.config import to_toml

    (tmp_path / "run" / "config.toml").write_text(to_toml(cfg))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 9, proc.stderr
    run = tmp_path / "run"
    assert any(p.name.startswith(".tmp-checkpoint-4") for p in run.iterdir())
    assert latest_checkpoint(run).name == "checkpoint-2"
    saved = load_checkpoint(run / "checkpoint-2", model=build("tiny", vocab_size=257))
    assert saved["trainer"]["step"] == 2
    state = Trainer(
        tiny_config(tmp_path, train__max_steps=6, checkpoint__save_every=2, checkpoint__resume_from="latest")
    ).train()
    assert state.step == 6 and latest_checkpoint(run).name == "checkpoint-6"
