"""Where numbers go: metrics.jsonl, the progress bar or log lines, and the experiment trackers."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from trainer.parallel.distributed import all_reduce_sum
from trainer.runtime import peak_memory_bytes


def _clean(value):
    # JSON has no NaN or inf: a non-finite value is written as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: str | Path, last_step: int) -> None:
    """Drops lines after `last_step`: a resumed run rewrites the steps after its checkpoint."""
    path = Path(path)
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


class PendingSteps:
    """Per-step values that stay on the device until a log step reads them all back in one transfer.

    Each step adds its loss (this rank's share), label-token count (global), gradient norm
    (global) and learning rate; `read` sums the losses over ranks together with the stop votes in
    one all-reduce, and returns one record per step.
    """

    def __init__(self, device: torch.device, n_experts: int = 0):
        self.device = device
        self.n_experts = n_experts  # > 0: a mixture of experts, whose steps add their routing figures
        self.steps: list[tuple[int, float]] = []
        self.values: list[torch.Tensor] = []
        self.routing: list[torch.Tensor] = []

    def add(
        self,
        step: int,
        lr: float,
        loss: torch.Tensor,
        label_tokens: torch.Tensor,
        grad_norm: torch.Tensor,
        routing: torch.Tensor | None = None,
    ):
        """routing (MoE): this rank's share of the step's load-balancing loss, then the tokens each
        expert of each MoE layer received (layers x experts, flattened)."""
        self.steps.append((step, lr))
        # The norm is on the CPU under fsdp_cpu_offload: a no-op copy elsewhere.
        self.values.append(
            torch.stack(
                [loss.double(), label_tokens.to(self.device, torch.float64), grad_norm.to(self.device, torch.float64)]
            )
        )
        if self.n_experts:
            self.routing.append(routing.double())

    def __len__(self) -> int:
        return len(self.steps)

    def read(self, stop_vote: bool) -> tuple[list[dict], bool]:
        """(records with step, loss, lr, grad_norm, tokens; whether any rank voted to stop): the host sync."""
        n = len(self.steps)
        values = torch.stack(self.values) if n else torch.zeros(0, 3, dtype=torch.float64, device=self.device)
        vote = torch.tensor([float(stop_vote)], dtype=torch.float64, device=self.device)
        routing = torch.cat(self.routing) if self.routing else vote[:0]
        summed = torch.cat([values[:, 0], vote, routing])
        all_reduce_sum(summed)  # losses, votes and routing over ranks; tokens and norms are already global
        routing = summed[n + 1 :].view(n, -1)
        summed = summed[: n + 1]
        flat = torch.cat([summed, values[:, 1], values[:, 2]]).tolist()
        losses, votes, tokens, norms = flat[:n], flat[n], flat[n + 1 : 2 * n + 1], flat[2 * n + 1 :]
        records = [
            {"step": step, "loss": loss, "lr": lr, "grad_norm": norm, "tokens": int(count)}
            for (step, lr), loss, count, norm in zip(self.steps, losses, tokens, norms)
        ]
        if self.n_experts:
            counts = routing[:, 1:].reshape(n, -1, self.n_experts)  # steps x MoE layers x experts
            load = counts.max(dim=-1).values / counts.mean(dim=-1).clamp(min=1e-9)
            for record, aux, layers in zip(records, routing[:, 0].tolist(), load.tolist()):
                record.update(aux_loss=aux, expert_load=[round(x, 4) for x in layers])
        self.steps.clear()
        self.values.clear()
        self.routing.clear()
        return records, votes > 0


class Throughput:
    """Input tokens per second over each read-back window, and over the run after the first window
    (which pays for warm-up: compilation, allocator and cache growth)."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.window_start = time.perf_counter()
        self.windows = 0
        self.first_seconds, self.first_steps = 0.0, 0
        self.steady_seconds, self.steady_steps = 0.0, 0

    def window(self, n_steps: int) -> float:
        """Tokens/s of the `n_steps` since the last call; starts the next window."""
        now = time.perf_counter()
        seconds, self.window_start = now - self.window_start, now
        if self.windows:
            self.steady_seconds += seconds
            self.steady_steps += n_steps
        else:
            self.first_seconds, self.first_steps = seconds, n_steps
        self.windows += 1
        return n_steps * self.tokens_per_step / max(seconds, 1e-9)

    @property
    def warming_up(self) -> bool:
        """Whether the last window was the first: its rate includes the start-up."""
        return self.windows == 1

    @property
    def steady(self) -> float | None:
        return self.steady_steps * self.tokens_per_step / self.steady_seconds if self.steady_steps else None

    @property
    def seconds_per_step(self) -> float | None:
        """The steady time per step, or the first window's (start-up included) before there is one."""
        if self.steady_steps:
            return self.steady_seconds / self.steady_steps
        return self.first_seconds / self.first_steps if self.first_steps else None


class RunProgress:
    """What the loop keeps between read-backs: the steps not read back yet, the throughput windows,
    the non-finite streak, the data position after the last step, and where this session began."""

    def __init__(self, device: torch.device, tokens_per_step: int, state, loader_state: dict, n_experts: int = 0):
        self.device = device
        self.pending = PendingSteps(device, n_experts)
        self.throughput = Throughput(tokens_per_step)
        self.streak = 0  # non-finite steps in a row
        self.loader_state = loader_state
        self.start_time = time.perf_counter()
        self.start_step, self.start_tokens, self.earlier_runtime_s = state.step, state.tokens_seen, state.runtime_s

    def read_back(self, stop_vote: bool, first_step_figures) -> tuple[list[dict], bool]:
        """PendingSteps.read, each record with the window's tokens/s and the peak memory; the last
        with a mixture's tokens per source; the session's first step with `first_step_figures()`."""
        records, voted = self.pending.read(stop_vote)
        tokens_per_s, peak = self.throughput.window(len(records)), peak_memory_bytes(self.device)
        by_source = self.loader_state.get("tokens_by_source")  # a mixture's tokens drawn per source, to date
        for record in records:
            record.update(tokens_per_s=tokens_per_s, peak_mem_bytes=peak)
            if by_source and record is records[-1]:
                record["tokens_by_source"] = by_source
            if record["step"] == self.start_step + 1:
                record.update(first_step_figures())
        return records, voted

    def eta_s(self, step: int, max_steps: int) -> float:
        return self.throughput.seconds_per_step * (max_steps - step)

    @property
    def seconds(self) -> float:
        """Seconds since this session began."""
        return time.perf_counter() - self.start_time


class MetricsLogger:
    def __init__(self, output_dir: Path, train, start_step: int, *, enabled: bool, trackers=None):
        """`train`: the [train] section (progress, max_steps, log_every)."""
        self.enabled = enabled
        progress, max_steps = train.progress, train.max_steps
        self.max_steps, self.log_every = max_steps, train.log_every
        self.file = open(output_dir / "metrics.jsonl", "a") if enabled else None
        if progress == "auto":
            progress = "bar" if sys.stderr.isatty() else "lines"
        self.bar = None
        if enabled and progress == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self.lines = enabled and progress == "lines"
        self.trackers = trackers  # trainer.trackers.Trackers: each line written also goes to them

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def _write(self, record: dict) -> None:
        line = {k: _clean(v) for k, v in record.items()}
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()
        if self.trackers is not None:
            self.trackers.log(line)

    def log_step(self, record: dict, eta_s: float | None = None, warming_up: bool = False) -> None:
        """Writes the step's record; at log steps, a progress line with the time left (`eta_s`) and
        the read-back window's tokens/s (`warming_up`: the first window's, start-up included)."""
        if not self.enabled:
            return
        self._write(record)
        step = record["step"]
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(
                loss=f"{record['loss']:.4f}",
                lr=f"{record['lr']:.2e}",
                tok_s=f"{record['tokens_per_s']:,.0f}",
                refresh=False,
            )
        elif self.lines and (step % self.log_every == 0 or step == self.max_steps):
            self.message(
                f"step {step}/{self.max_steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                f"grad_norm {record['grad_norm']:.3f} | "
                + (f"aux_loss {record['aux_loss']:.4f} | " if "aux_loss" in record else "")
                + f"{record['tokens_per_s']:,.0f} tok/s"
                f"{' (warm-up)' if warming_up else ''} | eta {'--' if eta_s is None else format_duration(eta_s)}"
            )

    def log_eval(self, record: dict) -> None:
        if not self.enabled:
            return
        self._write(record)
        self.message(
            f"eval at step {record['step']}: eval_loss {record['eval_loss']:.4f} | "
            f"perplexity {record['perplexity']:.2f}"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
