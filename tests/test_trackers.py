"""train.report_to: each tracker through its real library, offline, read back with that library's own reader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest

from tests.helpers import StopAt, tiny_config, write_corpus
from tests.test_cli import run_cli, tiny_args
from trainer.config import TrainingConfig, report_to
from trainer.errors import ConfigError, TrainerError
from trainer.metrics import read_metrics
from trainer.trackers import BACKENDS, TensorBoardTracker, mlflow_key, scalars


def train_lines(run):
    return [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def eval_lines(run):
    return [r for r in read_metrics(run / "metrics.jsonl") if "eval_loss" in r]


def saved_trainer_state(checkpoint):
    return json.loads((checkpoint / "trainer_state.json").read_text())["trainer"]


# ---------------------------------------------------------------- the setting


def test_report_to_is_a_comma_list_and_the_old_tensorboard_flag_adds_tensorboard():
    assert report_to(TrainingConfig()) == []
    assert report_to(TrainingConfig(report_to="none")) == []
    assert report_to(TrainingConfig(report_to="wandb, MLflow,wandb")) == ["wandb", "mlflow"]
    assert report_to(TrainingConfig(report_to="trackio", tensorboard=True)) == ["trackio", "tensorboard"]
    assert report_to(TrainingConfig(tensorboard=True)) == ["tensorboard"]


def test_every_name_the_config_allows_has_a_backend():
    from trainer.config import TRACKERS

    assert sorted(TRACKERS) == sorted(BACKENDS)


@pytest.mark.parametrize(
    "value, message",
    [
        ("wandbb", "train.report_to: unknown tracker 'wandbb'; did you mean wandb? choose from: tensorboard, wandb"),
        ("none,mlflow", "names none beside trackers"),
    ],
)
def test_a_wrong_report_to_is_one_line_and_exit_2(tmp_path, value, message):
    proc = run_cli("train", *tiny_args(tmp_path), f"--train.report_to={value}", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_tracker_that_is_not_installed_stops_the_run_before_it_writes(tmp_path, monkeypatch):
    from trainer import Trainer

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    with pytest.raises(ConfigError, match=r"^train.report_to=wandb needs the wandb package: pip install wandb$"):
        Trainer(tiny_config(tmp_path, train__report_to="wandb")).train()
    assert not (tmp_path / "run").exists()


def test_scalars_flatten_per_source_counts_and_leave_out_nulls():
    line = {"step": 3, "loss": None, "lr": 1e-3, "tokens_by_source": {"a.txt": 64, "b": 32}}
    assert scalars(line) == {"step": 3, "lr": 1e-3, "tokens_by_source/a.txt": 64, "tokens_by_source/b": 32}


# ---------------------------------------------------------------- failures


def test_a_tracker_failing_mid_run_warns_once_and_the_run_goes_on(tmp_path, monkeypatch):
    from trainer import Trainer

    calls = []
    real_log = TensorBoardTracker.log

    def log_then_fail(self, record):
        calls.append(record["step"])
        if len(calls) >= 2:
            raise OSError("No space left on device")
        real_log(self, record)

    monkeypatch.setattr(TensorBoardTracker, "log", log_then_fail)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(tiny_config(tmp_path, train__max_steps=5, train__log_every=1, train__report_to="tensorboard")).train()
    messages = [str(w.message) for w in caught if "report_to" in str(w.message)]
    assert messages == [
        "train.report_to=tensorboard failed at step 1 (No space left on device); "
        "it gets nothing more from this run, which goes on"
    ]
    assert len(calls) == 2  # dropped after its failure
    assert [r["step"] for r in train_lines(tmp_path / "run")] == [1, 2, 3, 4, 5]
    assert (tmp_path / "run" / "final").is_dir()


def test_a_tracker_that_fails_to_start_is_one_line_before_training(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from trainer import Trainer

    # MLflow refuses a file store unless MLFLOW_ALLOW_FILE_STORE is set: a real start failure.
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    with pytest.raises(TrainerError) as error:
        Trainer(tiny_config(tmp_path, train__report_to="mlflow")).train()
    message = str(error.value)
    assert message.startswith("train.report_to=mlflow could not start: ") and "\n" not in message
    assert "MLFLOW_ALLOW_FILE_STORE" in message
    assert train_lines(tmp_path / "run") == []


# ---------------------------------------------------------------- the real libraries, offline


@pytest.mark.slow
def test_wandb_offline_gets_every_line_and_the_config(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from trainer import Trainer

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_PROJECT", "tests")
    Trainer(tiny_config(tmp_path, train__max_steps=4, train__eval_every=2, train__report_to="wandb")).train()
    run = tmp_path / "run"

    # wandb's own reader of its offline transaction log
    [run_dir] = (tmp_path / "wandb").glob("offline-run-*")
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    logged_train = [h for h in history if "loss" in h]
    assert [h["step"] for h in logged_train] == [1, 2, 3, 4]
    assert [h["loss"] for h in logged_train] == pytest.approx([r["loss"] for r in train_lines(run)])
    assert [h["tokens_per_s"] for h in logged_train] == pytest.approx([r["tokens_per_s"] for r in train_lines(run)])
    assert logged_train[0]["param_bytes"] == train_lines(run)[0]["param_bytes"]
    logged_eval = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    assert logged_eval == [(r["step"], r["eval_loss"]) for r in eval_lines(run)]
    [header] = [r["run"] for r in records if r["type"] == "run"]
    assert header["project"] == "tests" and header["display_name"] == "run"
    config = {}
    for r in records:
        if r["type"] == "config":
            config.update(r["config"]["update"])
    config.update(header.get("config", {}).get("update", {}))
    assert config["train"]["max_steps"] == 4 and config["model"]["preset"] == "tiny"
    assert saved_trainer_state(run / "checkpoint-4")["tracker_runs"] == {"wandb": header["run_id"]}


@pytest.mark.slow
def test_mlflow_file_store_gets_every_line_and_a_resume_appends_to_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    from trainer import Trainer

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tests")
    a, b = write_corpus(tmp_path / "a", n_docs=12, seed=1), write_corpus(tmp_path / "b", n_docs=12, seed=2)
    settings = dict(
        data__path=f"{a},{b}",
        data__weights="0.7,0.3",
        train__max_steps=6,
        train__log_every=2,
        train__report_to="mlflow",
    )
    Trainer(tiny_config(tmp_path, **settings), callbacks=[StopAt(3)]).train()
    run_id = saved_trainer_state(tmp_path / "run" / "checkpoint-3")["tracker_runs"]["mlflow"]
    Trainer(tiny_config(tmp_path, **settings, checkpoint__resume_from="latest")).train()
    run = tmp_path / "run"

    client = MlflowClient()
    experiment = client.get_experiment_by_name("tests")
    [only_run] = client.search_runs([experiment.experiment_id])
    assert only_run.info.run_id == run_id and only_run.info.status == "FINISHED"
    assert only_run.data.params["train.max_steps"] == "6" and only_run.data.params["data.weights"] == "0.7,0.3"

    def history(key):
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))

    lines = train_lines(run)
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]  # metrics.jsonl over both sessions
    assert history("loss") == [(r["step"], r["loss"]) for r in lines]
    assert history("grad_norm") == [(r["step"], r["grad_norm"]) for r in lines]
    assert history("peak_mem_bytes") == [(r["step"], r["peak_mem_bytes"]) for r in lines]
    assert history("eval_loss") == [(r["step"], r["eval_loss"]) for r in eval_lines(run)]
    by_source = [r for r in lines if "tokens_by_source" in r]
    assert by_source  # the last line of each read-back carries the mixture's counts
    for name in (str(a), str(b)):
        counts = [(r["step"], r["tokens_by_source"][name]) for r in by_source]
        assert history(mlflow_key(f"tokens_by_source/{name}")) == counts


@pytest.mark.slow
def test_trackio_local_gets_every_line(tmp_path):
    pytest.importorskip("trackio")
    # trackio reads TRACKIO_DIR when it is imported: the run and the reader each get a process of their own.
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "TRACKIO_PROJECT": "tests"}
    args = tiny_args(tmp_path, train__max_steps=4, train__eval_every=2, train__report_to="trackio")
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "train", *args], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    reader = (
        "import json, trackio; from trackio.sqlite_storage import SQLiteStorage; "
        "[run] = trackio.Api().runs('tests'); "
        "print(json.dumps({'name': run.name, 'config': run.config, 'logs': SQLiteStorage.get_logs('tests', run.name)}))"
    )
    out = subprocess.run([sys.executable, "-c", reader], env=env, capture_output=True, text=True, check=True).stdout
    logged = json.loads(out.strip().splitlines()[-1])
    run = tmp_path / "run"
    assert logged["name"] == "run" and logged["config"]["train.max_steps"] == 4
    train = [(log["step"], log["loss"]) for log in logged["logs"] if "loss" in log]
    assert train == [(r["step"], r["loss"]) for r in train_lines(run)]
    evals = [(log["step"], log["eval_loss"]) for log in logged["logs"] if "eval_loss" in log]
    assert evals == [(r["step"], r["eval_loss"]) for r in eval_lines(run)]
    assert saved_trainer_state(run / "checkpoint-4")["tracker_runs"] == {"trackio": "run"}
