"""APOLLO: AdamW with SGD-like memory (Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance",
MLSys 2025, arXiv:2412.05270), the update apollo-torch's `APOLLOAdamW` makes.

A targeted weight matrix W (m x n) keeps AdamW moments only of its gradient G under a random
projection to rank r: R = G P^T (m x r, when m >= n) or P^T G (r x n), P drawn from a seeded normal
distribution with variance 1/r and redrawn every `apollo_update_proj_gap` steps. The AdamW update
of R, N = m / (sqrt(v) + eps), says how much Adam would rescale each row (or column) of the
gradient: s = ||N_i|| / ||R_i|| ("channel"), or one s = ||N|| / ||R|| for the whole matrix
("tensor"). W moves by the raw gradient times s, times sqrt(`apollo_scale`), with Adam's
bias-corrected step size, after a norm-growth limiter (Fira, arXiv:2410.01623) caps the growth
of that update's norm to 1.01x per step. The state is 2 x r x max(m, n) moments, the r x min(m, n)
projection and one scalar per matrix. The other parameters (embeddings, norms) get plain AdamW.

Written here rather than taken from apollo-torch 1.0.3, whose update it reproduces (a test
compares the two step by step, across a projection refresh):
- apollo-torch keeps a Python projector object in the optimizer state, which
  `torch.load(weights_only=True)` refuses; here the projection is a tensor and its seed an int.
- Its norm-growth limiter compares a tensor with a float in Python (`max(norm, 1.01)`): one host
  sync per matrix per step. Here it is a clamp on the device.
- Its seed is the parameter's position in its own optimizer, so with one optimizer per parameter
  (the layer-wise mode) every matrix of a shape gets the same projection. Here the seeds are the
  positions in the whole model's groups in either mode, so layer-wise steps equal ordinary ones.
- Its channel scale is only consistent with proj_type "std" (the projection on the shorter side);
  that is the only projection offered here.
"""

from __future__ import annotations

import math

import torch

# Keys of the param group whose matrices get APOLLO's update (see trainer/optim/__init__.py).
APOLLO_KEYS = ("apollo_rank", "apollo_update_proj_gap", "apollo_scale", "apollo_scale_type")
NORM_GROWTH_LIMIT = 1.01  # Fira's limiter: an update's norm grows at most this much per step
EPS_SCALE = 1e-8  # guards the division by the projected gradient's norm, as apollo-torch does


def random_projection(shape: tuple[int, int], seed: int, device, dtype: torch.dtype) -> torch.Tensor:
    """A seeded normal matrix with variance 1/rank (rank = the shorter side of `shape`), drawn in fp32
    on `device` and then cast (the stream of numbers apollo-torch draws for the same seed)."""
    rank = min(shape)
    generator = torch.Generator(device=device).manual_seed(seed)
    matrix = torch.randn(shape, generator=generator, device=device, dtype=torch.float32) / math.sqrt(rank)
    return matrix.to(dtype)


def next_seed(seed: int) -> int:
    """The seed of the projection after the one drawn with `seed`: the 15th int64 of a CPU generator
    seeded with it (apollo-torch's sequence, so its projections and ours coincide)."""
    generator = torch.Generator().manual_seed(seed)
    return int(torch.randint(0, torch.iinfo(torch.int64).max, (15,), generator=generator)[-1])


class Apollo(torch.optim.Optimizer):
    """APOLLO-AdamW over `param_groups`; a group holding the APOLLO_KEYS is scaled (module docstring),
    the others get AdamW. `seeds` maps each parameter to its projection seed (its 1-based position in
    the model's groups); parameters it does not list are numbered by their position here."""

    def __init__(
        self,
        param_groups: list[dict],
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float = 0.0,
        seeds: dict[torch.Tensor, int] | None = None,
    ):
        super().__init__(param_groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        own = (p for group in self.param_groups for p in group["params"])
        self.seeds = {p: (seeds or {}).get(p, index) for index, p in enumerate(own, start=1)}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            scaled = "apollo_rank" in group
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    if scaled:
                        state["seed"] = self.seeds[p]
                low_rank = self._project(p, grad, group, state) if scaled else grad
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(low_rank)
                    state["exp_avg_sq"] = torch.zeros_like(low_rank)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                exp_avg.mul_(beta1).add_(low_rank, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(low_rank, low_rank, value=1 - beta2)
                step_size = group["lr"] * math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
                normalized = exp_avg / exp_avg_sq.sqrt().add_(group["eps"])
                update = self._scaled_gradient(grad, low_rank, normalized, group, state) if scaled else normalized
                p.add_(update, alpha=-step_size)
                if group["weight_decay"] > 0:  # decoupled, after the update (apollo-torch's order)
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss

    def _project(self, p: torch.Tensor, grad: torch.Tensor, group: dict, state: dict) -> torch.Tensor:
        """The gradient under the current random projection, redrawn every apollo_update_proj_gap steps."""
        rows, cols = grad.shape
        rank = min(group["apollo_rank"], rows, cols)  # build_optimizer warns when this clamps
        if state["step"] % group["apollo_update_proj_gap"] == 0:
            shape = (rank, cols) if rows >= cols else (rows, rank)
            state["projection"] = random_projection(shape, state["seed"], grad.device, grad.dtype)
            state["seed"] = next_seed(state["seed"])
        projection = state["projection"]
        return grad @ projection.T if rows >= cols else projection.T @ grad

    def _scaled_gradient(
        self, grad: torch.Tensor, low_rank: torch.Tensor, normalized: torch.Tensor, group: dict, state: dict
    ) -> torch.Tensor:
        """The raw gradient times Adam's scale measured in the projected space, norm-growth limited."""
        if group["apollo_scale_type"] == "channel":
            # Rows of the gradient when the projection shortened its columns (m >= n), else its columns.
            dim = 1 if grad.shape[0] >= grad.shape[1] else 0
            scale = torch.linalg.vector_norm(normalized, dim=dim, keepdim=True) / (
                torch.linalg.vector_norm(low_rank, dim=dim, keepdim=True) + EPS_SCALE
            )
        else:
            scale = torch.linalg.vector_norm(normalized) / (torch.linalg.vector_norm(low_rank) + EPS_SCALE)
        update = grad * scale
        norm = torch.linalg.vector_norm(update)
        if "update_norm" in state:
            limiter = torch.clamp(norm / (state["update_norm"] + EPS_SCALE), min=NORM_GROWTH_LIMIT) / NORM_GROWTH_LIMIT
            update.div_(limiter)
            norm = norm / limiter
        state["update_norm"] = norm
        return update.mul_(math.sqrt(group["apollo_scale"]))
