"""Experiment trackers (train.report_to): TensorBoard, Weights & Biases, MLflow and trackio.

Each backend goes through its own library, imported only when the run asks for it, and is fed
the very dicts metrics.jsonl gets (train and eval lines), plus the run's config once. Only rank 0
tracks. `Trackers` runs the backends' `log` on a thread of its own, so a slow or failing backend
never holds up a step: a backend that fails mid-run warns once and gets nothing more, and the run
goes on. Not being installed or failing to start is one line before training starts.

A resumed run appends to the same tracker run where the backend can: the id each backend returns
from `start` is kept in the trainer state (`TrainerState.tracker_runs`), which every checkpoint
saves.
"""

from __future__ import annotations

import os
import queue
import re
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from trainer.config import report_to, to_toml
from trainer.errors import ConfigError, TrainerError

DEFAULT_PROJECT = "kernel-trainer"  # the project (W&B, trackio) or experiment (MLflow) unless its env var names one
FINISH_TIMEOUT_S = 120.0  # how long the end of a run waits for the trackers to take their last lines


@dataclass
class TrackedRun:
    """What a backend needs to open (or reopen) its run."""

    folder: Path  # the run's output folder
    name: str  # the run's display name: the output folder's name
    config: dict  # the effective config, {section: {key: value}}
    config_toml: str
    resume_ids: dict[str, str]  # {backend name: its own id of this run}, from the checkpoint; {}: a new run
    start_step: int  # the step the run starts (or resumes) at


def scalars(record: dict) -> dict[str, float]:
    """A metrics.jsonl line as flat numbers: nested dicts (tokens_by_source) become `key/name`, None is left out."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            for name, inner in value.items():
                if isinstance(inner, (int, float)) and not isinstance(inner, bool):
                    flat[f"{key}/{name}"] = inner
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[key] = value
    return flat


def flat_config(config: dict) -> dict[str, object]:
    """{section: {key: value}} -> {"section.key": value}, as the command line spells the keys."""
    return {f"{section}.{key}": value for section, values in config.items() for key, value in values.items()}


class TensorBoardTracker:
    name = "tensorboard"

    @staticmethod
    def check_installed() -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise ConfigError(
                "train.report_to=tensorboard needs the tensorboard package: pip install tensorboard"
            ) from None

    def start(self, run: TrackedRun, resume_id: str | None) -> str | None:
        from torch.utils.tensorboard import SummaryWriter

        # The run's folder is its TensorBoard run: a resumed run appends to it, and drops the events its
        # previous session wrote after the checkpoint it resumes from.
        purge_step = run.start_step + 1 if run.start_step else None
        self.writer = SummaryWriter(str(run.folder / "tensorboard"), purge_step=purge_step)
        if not run.start_step:
            self.writer.add_text("config", "```toml\n" + run.config_toml + "\n```", 0)
        return None

    def log(self, record: dict) -> None:
        for key, value in scalars(record).items():
            if key != "step":
                self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()

    def finish(self, failed: bool) -> None:
        self.writer.close()


class WandbTracker:
    """Weights & Biases; WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE=offline and the rest of wandb's variables apply."""

    name = "wandb"

    @staticmethod
    def check_installed() -> None:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("train.report_to=wandb needs the wandb package: pip install wandb") from None

    def start(self, run: TrackedRun, resume_id: str | None) -> str | None:
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
            name=run.name,
            id=resume_id,
            resume="allow" if resume_id else None,
            dir=os.environ.get("WANDB_DIR") or run.folder,  # wandb/ inside the run's folder unless WANDB_DIR says
        )
        # A resumed run may change settings (train.max_steps, checkpoint.resume_from): the config follows.
        self.run.config.update(run.config, allow_val_change=True)
        # The charts' x axis is the optimizer step of each line, so a resumed run's lines land where they belong.
        self.run.define_metric("*", step_metric="step")
        return self.run.id

    def log(self, record: dict) -> None:
        self.run.log(scalars(record))

    def finish(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MlflowTracker:
    """MLflow through its client; MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_NAME choose where the run goes."""

    name = "mlflow"

    @staticmethod
    def check_installed() -> None:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise ConfigError("train.report_to=mlflow needs MLflow: pip install mlflow-skinny (or mlflow)") from None

    def start(self, run: TrackedRun, resume_id: str | None) -> str | None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient()
        if resume_id:
            self.run_id = resume_id
            self.client.get_run(self.run_id)  # fails at start, not mid-run, when the run is not there
            self.client.update_run(self.run_id, status="RUNNING")
            return self.run_id  # MLflow refuses to change a logged parameter: the first session's config stays
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
        experiment = self.client.get_experiment_by_name(experiment_name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(experiment_name)
        self.run_id = self.client.create_run(experiment_id, run_name=run.name).info.run_id
        params = [Param(key, str(value)) for key, value in flat_config(run.config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters a request
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        return self.run_id

    def log(self, record: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(mlflow_key(key), float(value), now, record["step"])
            for key, value in scalars(record).items()
            if key != "step"
        ]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def mlflow_key(key: str) -> str:
    """A metric name MLflow accepts: letters, digits and _ - . space : /, read as a normalised relative path
    (a source's path in `tokens_by_source/<source>` may hold other characters, `//` or `..`)."""
    parts = re.sub(r"[^\w\-. :/]", "_", key).split("/")
    return "/".join(part for part in parts if part not in ("", ".", ".."))


class TrackioTracker:
    """trackio, local by default (TRACKIO_DIR); TRACKIO_PROJECT names the project, TRACKIO_SPACE_ID a Space."""

    name = "trackio"

    @staticmethod
    def check_installed() -> None:
        try:
            import trackio  # noqa: F401
        except ImportError:
            raise ConfigError("train.report_to=trackio needs the trackio package: pip install trackio") from None

    def start(self, run: TrackedRun, resume_id: str | None) -> str | None:
        import trackio

        # trackio resumes a run by its name.
        self.run = trackio.init(
            project=os.environ.get("TRACKIO_PROJECT") or DEFAULT_PROJECT,
            name=resume_id or run.name,
            config=flat_config(run.config),
            resume="allow" if resume_id else "never",
            embed=False,
        )
        return self.run.name

    def log(self, record: dict) -> None:
        values = scalars(record)
        step = values.pop("step")
        self.run.log(values, step=step)

    def finish(self, failed: bool) -> None:
        self.run.finish()


# train.report_to's names (config.TRACKERS) -> their backends.
BACKENDS = {
    "tensorboard": TensorBoardTracker,
    "wandb": WandbTracker,
    "mlflow": MlflowTracker,
    "trackio": TrackioTracker,
}


def check_installed(names: list[str]) -> None:
    """A ConfigError naming the package when a named tracker's library is missing."""
    for name in names:
        BACKENDS[name].check_installed()


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:1000]


class Trackers:
    """The run's trackers (none on ranks other than 0): started before training, fed from a thread."""

    def __init__(self, names: list[str]):
        self.backends = [BACKENDS[name]() for name in names]
        self.failed: list = []  # backends dropped after a failure: still asked to close their run at the end
        self.queue: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None

    def start(self, run: TrackedRun) -> dict[str, str]:
        """Opens each backend's run; returns {name: the backend's run id} to keep for a resume."""
        ids = {}
        for backend in self.backends:
            try:
                run_id = backend.start(run, run.resume_ids.get(backend.name))
            except Exception as e:
                started = self.backends[: self.backends.index(backend)]
                self.backends = started
                self._finish_backends(failed=True)
                raise TrainerError(f"train.report_to={backend.name} could not start: {first_line(e)}") from None
            if run_id is not None:
                ids[backend.name] = run_id
        if self.backends:
            self.thread = threading.Thread(target=self._feed, name="trackers", daemon=True)
            self.thread.start()
        return ids

    def log(self, record: dict) -> None:
        """Hands a metrics.jsonl line (as written: non-finite values are None) to every backend, off this thread."""
        if self.thread is not None:
            self.queue.put(record)

    def _feed(self) -> None:
        for record in iter(self.queue.get, None):
            for backend in list(self.backends):
                try:
                    backend.log(record)
                except Exception as e:
                    self.backends.remove(backend)
                    self.failed.append(backend)
                    warnings.warn(
                        f"train.report_to={backend.name} failed at step {record.get('step')} ({first_line(e)}); "
                        "it gets nothing more from this run, which goes on",
                        stacklevel=1,
                    )

    def finish(self, failed: bool = False) -> None:
        """Waits for the lines not yet logged, then closes each backend's run (marked failed when the run failed)."""
        if self.thread is None:
            return
        self.queue.put(None)
        self.thread.join(FINISH_TIMEOUT_S)
        if self.thread.is_alive():
            warnings.warn(
                f"train.report_to: {', '.join(b.name for b in self.backends)} still logging after "
                f"{FINISH_TIMEOUT_S:.0f} s; the last lines may be missing there (metrics.jsonl has them all)",
                stacklevel=1,
            )
            return
        self.thread = None
        self._finish_backends(failed)

    def _finish_backends(self, failed: bool) -> None:
        for backend in self.backends:
            try:
                backend.finish(failed)
            except Exception as e:
                warnings.warn(f"train.report_to={backend.name} failed to close its run: {first_line(e)}", stacklevel=1)
        for backend in self.failed:  # it has warned once already
            try:
                backend.finish(failed)
            except Exception:
                pass
        self.backends, self.failed = [], []


def start_trackers(config, state, folder: Path, is_main: bool) -> Trackers:
    """Rank 0's trackers, started (none elsewhere); a resumed run reopens the tracker runs its
    checkpoint names, and `state.tracker_runs` keeps their ids for the next resume."""
    trackers = Trackers(report_to(config.train) if is_main else [])
    run = TrackedRun(
        folder=folder,
        name=folder.name,
        config=config.to_dict(),
        config_toml=to_toml(config),
        resume_ids=dict(state.tracker_runs),
        start_step=state.step,
    )
    state.tracker_runs.update(trackers.start(run))
    return trackers
