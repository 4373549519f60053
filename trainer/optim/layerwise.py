"""Layer-wise updates: each parameter is stepped inside backward, the moment its gradient is complete.

A post-accumulate-grad hook on every parameter runs that parameter's own optimizer and then frees
its gradient, so at most one parameter's gradient is held at a time instead of all of them (the
GaLore paper's "per-layer weight updates", after LOMO, Lv et al. 2023).

`LayerwiseOptimizer` keeps the `torch.optim.Optimizer` interface so the LR scheduler, checkpoints
and resume work unchanged:
- `param_groups` are its own; the hook copies the group's current lr into the parameter's
  optimizer before stepping it. The scheduler therefore advances once per optimizer step, and the
  step k update uses the lr the schedule set after step k - 1, exactly as in ordinary mode (GaLore's
  reference code steps its scheduler in every hook as well as in the loop).
- `step()` does nothing: the updates already happened during backward.
- `state_dict()` holds every parameter's optimizer state; it loads with weights_only=True.
- `grad_norm()` returns the total gradient norm, accumulated on the device by the hooks before
  each gradient was freed, for logging and the non-finite check.

What this mode cannot do, so the config refuses it (trainer/config.py): clipping by the global
norm (the norm is known only after every parameter has been updated), gradient accumulation (a
gradient must be kept across micro-batches, which is what this mode frees), fp16's loss scaler
(it cannot skip an update that already happened), and DDP/FSDP (the hook would run before the
gradient is reduced across ranks). For the same reason a non-finite step cannot be skipped: the
loop stops the run at once and names the last good checkpoint.

Activation checkpointing must be the non-reentrant kind (`use_reentrant=False`, what
trainer/parallel uses): a reentrant checkpoint runs a nested backward per block, and a weight used
both inside and outside blocks would then have its hook fire more than once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from trainer.optim.state import optimizer_state_tensors


class LayerwiseOptimizer(torch.optim.Optimizer):
    steps_in_backward = True

    def __init__(self, param_groups: list[dict], make_optimizer: Callable[[list[dict]], torch.optim.Optimizer]):
        super().__init__(param_groups, defaults={})
        # An index, not the group itself: load_state_dict replaces the group dicts.
        self.group_index: dict[torch.Tensor, int] = {}
        self.optimizer_of: dict[torch.Tensor, torch.optim.Optimizer] = {}
        for index, group in enumerate(self.param_groups):
            settings = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                self.group_index[p] = index
                self.optimizer_of[p] = make_optimizer([{**settings, "params": [p]}])
                p.register_post_accumulate_grad_hook(self._step_parameter)
        self._grad_norm_sq: torch.Tensor | None = None
        self.peak_grad_bytes = 0  # the largest gradient held at once: one parameter's

    @torch.no_grad()
    def _step_parameter(self, p: torch.Tensor) -> None:
        optimizer = self.optimizer_of[p]
        optimizer.param_groups[0]["lr"] = self.param_groups[self.group_index[p]]["lr"]
        norm_sq = torch.linalg.vector_norm(p.grad, dtype=torch.float32).square()
        self._grad_norm_sq = norm_sq if self._grad_norm_sq is None else self._grad_norm_sq + norm_sq
        self.peak_grad_bytes = max(self.peak_grad_bytes, p.grad.numel() * p.grad.element_size())
        optimizer.step()
        p.grad = None

    def grad_norm(self) -> torch.Tensor:
        """The norm of all gradients of the backward pass just run; starts the next sum afresh."""
        if self._grad_norm_sq is None:
            raise RuntimeError("no gradient reached a layer-wise hook in this step")
        norm, self._grad_norm_sq = self._grad_norm_sq.sqrt(), None
        return norm

    def step(self, closure=None):
        """Nothing to do: every parameter was updated inside backward."""

    def state_dict(self) -> dict:
        saved = super().state_dict()
        saved["per_parameter"] = [self.optimizer_of[p].state_dict() for p in self._parameters()]
        return saved

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        per_parameter = state_dict.pop("per_parameter")
        super().load_state_dict(state_dict)
        params = list(self._parameters())
        if len(per_parameter) != len(params):
            raise ValueError(
                f"the saved layer-wise state has {len(per_parameter)} parameters, this model {len(params)}"
            )
        for p, saved in zip(params, per_parameter, strict=True):
            self.optimizer_of[p].load_state_dict(saved)

    def state_tensors(self) -> Iterator[torch.Tensor]:
        for optimizer in self.optimizer_of.values():
            yield from optimizer_state_tensors(optimizer)

    def _parameters(self) -> Iterator[torch.Tensor]:
        for group in self.param_groups:
            yield from group["params"]
