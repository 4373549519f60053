"""Where one side of `python -m trainer bench` spends its time: torch.profiler per op and cProfile
per Python function, over a few steady training steps.

    python benchmarks/profile_overhead.py --side reference|optimized|peer [--steps N] [--warmup N]
        [--top N] [--section.key=value ...]

The side is built as bench builds it (trainer.bench.runner.reference_config for the eager
reference, the configuration as given for the optimized run; evaluation and checkpoints left out)
and trained through Trainer, so the loop, the batch thread and the callbacks are all in the
profile; `peer` is bench's Hugging Face Trainer side (trainer.bench.peers.run_hf_peer).

The steps after `--warmup` are profiled: first under torch.profiler (ops by self CPU time, and the
ATen calls per step, which on a GPU would be kernel launches), then as many again under cProfile
(Python functions by their own time). Relative shares are what to read: a profiled step runs
slower than an unprofiled one. A run's summaries are in benchmarks/results/cpu_profile_overhead.md.
"""

import argparse
import cProfile
import io
import pstats
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trainer.bench.peers import run_hf_peer  # noqa: E402
from trainer.bench.runner import reference_config  # noqa: E402
from trainer.bench.side import bench_parts  # noqa: E402
from trainer.callbacks import TrainerCallback  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.loop import Trainer  # noqa: E402


class ProfileWindow:
    """torch.profiler over steps [first, first + count), then cProfile over the next `count`; fed
    the number of steps done before each step begins and after each one ends."""

    def __init__(self, first: int, count: int):
        self.first, self.count = first, count
        self.torch_profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self.python_profile = cProfile.Profile()
        self.stage = "waiting"  # then "torch", "python", "done"

    def step_begins(self, done: int) -> None:
        if self.stage == "waiting" and done >= self.first:
            self.stage = "torch"
            self.torch_profile.start()
        elif self.stage == "torch" and done >= self.first + self.count:
            self.torch_profile.stop()
            self.stage = "python"
            self.python_profile.enable()

    def step_ended(self, done: int) -> None:
        if self.stage == "python" and done >= self.first + 2 * self.count:
            self.python_profile.disable()
            self.stage = "done"


class OurSteps(TrainerCallback):
    def __init__(self, window: ProfileWindow):
        self.window = window

    def on_step_begin(self, config, state, control, **kwargs):
        self.window.step_begins(state.step)

    def on_step_end(self, config, state, control, **kwargs):
        self.window.step_ended(state.step)


def peer_steps(window: ProfileWindow):
    """The same window as a transformers.TrainerCallback (imported only for the peer)."""
    from transformers import TrainerCallback as HFCallback

    class PeerSteps(HFCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            window.step_begins(state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            window.step_ended(state.global_step)

    return PeerSteps()


def op_table(profile, steps: int, top: int) -> str:
    events = [e for e in profile.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    aten_calls = sum(e.count for e in events if e.key.startswith("aten::"))
    lines = [
        f"self CPU over {steps} steps: {total / 1e3:.1f} ms ({total / 1e3 / steps:.1f} ms a step); "
        f"aten calls per step: {aten_calls / steps:.0f}",
        "| op | self ms / step | share | calls / step |",
        "|---|---:|---:|---:|",
    ]
    for e in events[:top]:
        lines.append(
            f"| `{e.key}` | {e.self_cpu_time_total / 1e3 / steps:.2f} | "
            f"{100 * e.self_cpu_time_total / total:.1f}% | {e.count / steps:.0f} |"
        )
    return "\n".join(lines)


def function_table(profile: cProfile.Profile, steps: int, top: int) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    text = out.getvalue()
    body = text[text.find("ncalls") :]
    return f"cProfile over {steps} steps, by own time (tottime):\n```\n{body.rstrip()}\n```"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", choices=("reference", "optimized", "peer"), required=True)
    parser.add_argument("--steps", type=int, default=5, help="steps under each profiler")
    parser.add_argument("--warmup", type=int, default=3, help="steps before the first profiled one")
    parser.add_argument("--top", type=int, default=15, help="rows of each table")
    args, overrides = parser.parse_known_args(argv)
    config = load_config(None, overrides)
    config.train.max_steps = args.warmup + 2 * args.steps
    config.train.output_dir = str(Path(config.train.output_dir or "runs/profile-overhead") / args.side)
    config.train.overwrite = True
    config.train.progress = "none"
    config.checkpoint.save_every = 0
    if args.side == "reference":
        config = reference_config(config)
    window = ProfileWindow(args.warmup, args.steps)
    if args.side == "peer":
        spec = {"peer": "hf", "mask_last_label": True}
        Path(config.train.output_dir).mkdir(parents=True, exist_ok=True)
        run_hf_peer(config, spec, extra_callbacks=[peer_steps(window)])
    else:
        parts = bench_parts(config, mask_last_label=False)
        Trainer(parts.config, callbacks=[OurSteps(window)], parts=parts).train()
    print(f"## {args.side}: {' '.join(overrides) or 'defaults'}, {torch.get_num_threads()} threads\n")
    print(op_table(window.torch_profile, args.steps, args.top))
    print()
    print(function_table(window.python_profile, args.steps, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
