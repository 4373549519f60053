"""`python -m trainer` / `trainer`: train, eval, generate, bench."""

from __future__ import annotations

import signal
import sys
import warnings

USAGE = """usage: python -m trainer <command> ...

commands:
  train [CONFIG.toml] [--section.key=value ...]   train (no arguments: the embedded default run)
  eval CHECKPOINT_DIR [--section.key=value ...]   loss and perplexity on the validation split
  generate CHECKPOINT_DIR --prompt TEXT           continue a prompt (--max-new-tokens, --temperature, --top-p, --seed)
  bench [CONFIG.toml] [--section.key=value ...]   the run against its eager reference: loss, tokens/s, memory
  plan [CONFIG.toml] [--section.key=value ...]    predicted peak memory of a step, and whether it fits (--json)

`python -m trainer train --help` lists every config key with its default.
"""


def cmd_train(argv: list[str]) -> int:
    from trainer.config import describe_keys, load_config, split_command_line
    from trainer.loop import Trainer

    if "-h" in argv or "--help" in argv:
        print("usage: python -m trainer train [CONFIG.toml] [--section.key=value ...]\n\nkeys (defaults):")
        print(describe_keys())
        return 0
    path, overrides = split_command_line(argv)
    trainer = Trainer(load_config(path, overrides))
    _interrupted["trainer"] = trainer
    trainer.train()
    if trainer.stop_requested:  # stopped early by SIGTERM/SIGINT, with a checkpoint saved
        return 128 + (trainer.stop_signal or signal.SIGTERM)
    return 0


def cmd_eval(argv: list[str]) -> int:
    from trainer.config import split_command_line
    from trainer.errors import ConfigError
    from trainer.eval_command import evaluate_checkpoint

    if "-h" in argv or "--help" in argv or not argv:
        print(
            "usage: python -m trainer eval CHECKPOINT_DIR [--section.key=value ...]\n"
            "Evaluates a checkpoint-<step> or final folder on its run's validation split; overrides such as "
            "--data.path=... or --train.eval_batches=0 (the whole split) apply to the run's saved config."
        )
        return 0 if argv else 2
    path, overrides = split_command_line(argv)
    if path is None:
        raise ConfigError("eval needs a checkpoint folder: python -m trainer eval runs/<run>/final")
    metrics = evaluate_checkpoint(path, overrides)
    print(
        f"eval_loss {metrics['eval_loss']:.4f} | perplexity {metrics['perplexity']:.2f} | "
        f"{metrics['eval_tokens']:,} tokens"
    )
    return 0


def cmd_bench(argv: list[str]) -> int:
    from trainer.bench import format_report, run_bench
    from trainer.config import describe_keys, load_config, split_command_line

    if "-h" in argv or "--help" in argv:
        print(
            "usage: python -m trainer bench [CONFIG.toml] [--section.key=value ...]\n"
            "Trains the configured run and its eager PyTorch reference from one initialisation on one data order,\n"
            "each in its own process; writes <output_dir>/bench.json and bench.png; exits 1 when the losses differ\n"
            "beyond the tolerance. The bench.* keys are its own.\n\nkeys (defaults):"
        )
        print(describe_keys())
        return 0
    path, overrides = split_command_line(argv)
    report = run_bench(load_config(path, overrides))
    print(format_report(report))
    return 1 if report["passed"] is False else 0


def cmd_generate(argv: list[str]) -> int:
    from trainer.generate import generate_command

    return generate_command(argv)


def cmd_plan(argv: list[str]) -> int:
    from trainer.plan import plan_command

    return plan_command(argv)


_interrupted: dict = {}  # the running Trainer, for what a second Ctrl-C says


def _interrupt_message() -> str:
    trainer = _interrupted.get("trainer")
    parts = getattr(trainer, "parts", None) if trainer is not None else None
    if parts is None:
        return "interrupted before training started; nothing was saved"
    from trainer.checkpoint import latest_checkpoint

    latest = latest_checkpoint(parts.output.folder)
    if latest is None:
        return (
            f"interrupted at step {parts.state.step}; nothing was saved and {parts.output.folder} holds no checkpoint"
        )
    return (
        f"interrupted at step {parts.state.step}; nothing was saved for it. Resume from {latest} with "
        f"--checkpoint.resume_from=latest --train.output_dir={parts.output.folder}"
    )


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings as `warning: <message>`, without the file and source line Python prints by default."""
    print(f"warning: {message}", file=file or sys.stderr)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "bench": cmd_bench, "generate": cmd_generate, "plan": cmd_plan}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    from trainer.data import DataError
    from trainer.errors import TrainerError

    warnings.showwarning = _one_line_warning
    try:
        return COMMANDS[command](rest)
    except (TrainerError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(_interrupt_message(), file=sys.stderr)
        return 128 + signal.SIGINT
