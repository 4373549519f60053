"""loss.png: the training loss (raw and smoothed) and the evaluation loss against the step."""

from __future__ import annotations

from pathlib import Path


def plot_losses(records: list[dict], out_path: str | Path) -> Path | None:
    """Returns the written path, or None when matplotlib is missing or there is nothing to plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="train loss")
        smoothed = centered_mean(losses, window=max(1, len(losses) // 25) * 2 + 1)
        ax.plot(steps, smoothed, color="tab:blue", linewidth=2, label="train loss (smoothed)")
    if evals:
        steps, losses = zip(*evals)
        ax.plot(steps, losses, "o-", color="tab:orange", linewidth=2, label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return Path(out_path)


def centered_mean(values, window: int) -> list[float]:
    """Each value averaged with as many neighbours on each side, up to window // 2 (fewer near the ends).

    Centred, unlike an exponential average, so the smoothed curve neither lags the raw one nor, at
    the ends, leans toward the side that has more points.
    """
    out, n = [], len(values)
    for i in range(n):
        half = min(window // 2, i, n - 1 - i)
        part = values[i - half : i + half + 1]
        out.append(sum(part) / len(part))
    return out
