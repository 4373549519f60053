"""One side of `python -m trainer bench`, run in a process of its own so its peak memory is its own.

    python -m trainer.bench.worker SPEC.json

SPEC.json names the side ("reference", "optimized" or "peer"), its config file, the JSON file to
write the result to, and the bench options that concern one side (mask_last_label, profile_trace,
warmup_steps). The result holds facts only: per-step losses and seconds, input tokens per step,
peak memory, the device and the compute dtype, the model's shape and a checksum of its initial
weights. trainer/bench/report.py turns them into tokens/s, MFU and the verdict.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from trainer.bench.peers import run_hf_peer
from trainer.bench.side import RecordSteps, bench_parts, side_facts
from trainer.callbacks import TrainerCallback
from trainer.config import load_config
from trainer.data import DataError
from trainer.errors import TrainerError
from trainer.loop import Trainer
from trainer.runtime import resolve_device

PROFILED_STEPS = 3  # enough steady steps to see the pattern in a trace a browser still opens quickly


class ProfileSteps(TrainerCallback):
    """torch.profiler over PROFILED_STEPS steps after `first_step`, exported as a chrome trace."""

    def __init__(self, path: Path, device: torch.device, first_step: int):
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(activities=activities, record_shapes=True)
        self.path, self.first_step, self.running, self.done, self.steps_left = path, first_step, False, False, 0

    def on_step_begin(self, config, state, control, **kwargs):
        if not self.running and not self.done and state.step >= self.first_step:
            self.profiler.start()
            self.running, self.steps_left = True, PROFILED_STEPS

    def on_step_end(self, config, state, control, **kwargs):
        if self.running:
            self.profiler.step()
            self.steps_left -= 1
            if self.steps_left == 0:
                self.on_train_end(config, state, control)

    def on_train_end(self, config, state, control, **kwargs):
        if self.running:
            self.profiler.stop()
            self.profiler.export_chrome_trace(str(self.path))
            self.running, self.done = False, True


def run_ours(config, spec: dict) -> dict:
    parts = bench_parts(config, spec["mask_last_label"])
    facts = side_facts(parts)
    recorder = RecordSteps()
    callbacks = [recorder]
    trace = Path(spec["profile_trace"]) if spec.get("profile_trace") else None
    if trace is not None:
        callbacks.append(ProfileSteps(trace, parts.device, first_step=spec["warmup_steps"]))
    trainer = Trainer(parts.config, callbacks=callbacks, parts=parts)
    trainer.train()
    if trainer.stop_requested:
        raise KeyboardInterrupt
    return {
        **facts,
        "losses": recorder.losses,
        "step_seconds": recorder.seconds,
        "peak_mem_bytes": recorder.peak_mem_bytes,
        "profile_trace": str(trace) if trace else None,
    }


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result_path = Path(spec["result"])
    try:
        config = load_config(spec["config"])
        if spec["side"] == "peer":
            result = run_hf_peer(config, spec)
        else:
            result = run_ours(config, spec)
    except (TrainerError, DataError) as e:
        result_path.write_text(json.dumps({"error": str(e)}))
        return 2
    except KeyboardInterrupt:  # Ctrl-C reaches the parent too, which stops the bench
        return 130
    except torch.OutOfMemoryError as e:
        device = resolve_device(load_config(spec["config"]).train.device)
        hint = " (pass --bench.reference=none to skip the eager reference)" if spec["side"] == "reference" else ""
        result_path.write_text(json.dumps({"error": f"out of memory on {device}{hint}: {str(e).splitlines()[0]}"}))
        return 2
    result_path.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
