"""The end of a run: train_results.json, loss.png and the summary printed for the user."""

from __future__ import annotations

import json
from pathlib import Path

from trainer.metrics import RunProgress, format_duration, read_metrics
from trainer.plot import plot_losses
from trainer.runtime import peak_memory_bytes


def write_run_summary(folder: Path, state, progress: RunProgress, *, n_params: int, device, final: Path | None) -> str:
    """Writes train_results.json and loss.png into `folder`; returns the summary text. `progress`
    says where this session began and how fast it went."""
    start_step, start_tokens, runtime_s = progress.start_step, progress.start_tokens, progress.seconds
    tokens_per_s, peak_mem_bytes = progress.throughput.steady, peak_memory_bytes(device)
    records = read_metrics(folder / "metrics.jsonl")
    evals = [r for r in records if r.get("eval_loss") is not None]
    initial = next((r for r in evals if r["step"] == 0), None)
    results = {
        "steps": state.step,
        "tokens_seen": state.tokens_seen,
        "runtime_s": runtime_s,
        "steps_this_run": state.step - start_step,
        "tokens_this_run": state.tokens_seen - start_tokens,
        "tokens_per_s": tokens_per_s,
        "final_train_loss": next((r["loss"] for r in reversed(records) if r.get("loss") is not None), None),
        "initial_eval_loss": initial["eval_loss"] if initial else None,
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "perplexity": evals[-1]["perplexity"] if evals else None,
        "best_eval_loss": state.best_metric,
        "best_checkpoint": state.best_checkpoint,
        "nonfinite_steps": state.nonfinite_steps,
        "peak_mem_bytes": peak_mem_bytes,
        "parameters": n_params,
        "device": str(device),
        "final_model": str(final) if final else None,
    }
    (folder / "train_results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot = plot_losses(records, folder / "loss.png")

    resumed = f" (resumed at step {start_step})" if start_step else ""
    text = [
        f"Trained a {n_params / 1e6:.1f}M-parameter model for {results['steps_this_run']} steps{resumed} "
        f"({results['tokens_this_run']:,} label tokens) in {format_duration(runtime_s)} on {device}"
        + (f", {tokens_per_s:,.0f} tokens/s." if tokens_per_s else ".")
    ]
    if results["eval_loss"] is not None:
        start = f"from {results['initial_eval_loss']:.3f} " if results["initial_eval_loss"] is not None else ""
        text.append(
            f"Validation loss went {start}to {results['eval_loss']:.3f} (perplexity {results['perplexity']:.1f})."
        )
    where = [
        f"Final model: {final}. Checkpoints: {folder}/checkpoint-*." if final else "",
        f"Metrics: {folder}/metrics.jsonl.",
        f"Loss plot: {plot}." if plot else "",
        f"Summary: {folder}/train_results.json.",
    ]
    if final and results["eval_loss"] is not None:
        where.append(f"Evaluate it again with `python -m trainer eval {final}`.")
    return " ".join(text + [w for w in where if w])
