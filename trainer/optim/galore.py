"""GaLore: gradient low-rank projection (Zhao et al., "GaLore: Memory-Efficient LLM Training by
Gradient Low-Rank Projection", ICML 2024, arXiv:2403.03507).

A targeted weight matrix W (m x n) is trained through a low-rank stand-in. Every
`galore_update_proj_gap` of its updates, the top-r singular vectors of its gradient G become the
projector P. Each step the inner optimizer (AdamW, 8-bit AdamW or Adafactor) sees only the
projected gradient, m x r or r x n, so its state is that small; its update is projected back and
added to W, times `galore_scale`.

How this differs from galore-torch 1.0, whose optimizers we do not use:
- The inner optimizer is an ordinary optimizer over low-rank stand-in tensors ("proxies"), one per
  matrix, in the weight's dtype. For each step a proxy is given zeroed memory and the projected
  gradient and is stepped; afterwards it holds exactly the low-rank update, which is added to W,
  and its memory is released again: between steps a proxy is an empty placeholder, so only the
  inner optimizer's state and the projectors stay resident. galore-torch instead clones the full
  weight every step and swaps `p.data` around, and its 8-bit variant hands `percentile_clipping` and `block_wise` to
  bitsandbytes positionally, where bitsandbytes >= 0.50 reads `max_unorm` and `skip_zeros`: the
  update is then clipped to 100 x the norm of the zeroed weight, i.e. to nothing, for every
  projected gradient under bitsandbytes' 8-bit size threshold. Ours passes arguments by name.
- The projector lives in the optimizer state as a plain tensor (galore-torch stores a Python
  object there), so `torch.load(weights_only=True)` reads our checkpoints, and resume is exact.
- No `torch.cuda.synchronize()`: this runs on CPU and GPU alike.
- Decoupled weight decay is applied to W itself (W *= 1 - lr * weight_decay), never to the proxy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from trainer.optim.state import optimizer_state_tensors


def projection_side(shape: torch.Size, proj_type: str) -> str:
    """Which side of an m x n matrix the projector multiplies: "left" (P is m x r) or "right" (r x n).

    std projects the shorter side away, so the projector is the smaller matrix (the paper's
    choice); reverse_std does the opposite; left and right force a side.
    """
    rows, cols = shape
    if proj_type == "std":
        return "right" if rows >= cols else "left"
    if proj_type == "reverse_std":
        return "left" if rows >= cols else "right"
    return proj_type


def orthonormal_basis(grad: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """The top-`rank` singular vectors of `grad` on `side`, in the gradient's dtype."""
    U, _, Vh = torch.linalg.svd(grad.float(), full_matrices=False)  # SVD needs fp32; bf16 has none
    basis = U[:, :rank] if side == "left" else Vh[:rank]
    # A copy, so the full U or Vh is freed rather than kept alive behind a slice.
    return basis.to(grad.dtype).clone(memory_format=torch.contiguous_format)


def project(grad: torch.Tensor, projector: torch.Tensor, side: str) -> torch.Tensor:
    return projector.T @ grad if side == "left" else grad @ projector.T


def add_projected_back(
    weight: torch.Tensor, low_rank: torch.Tensor, projector: torch.Tensor, side: str, scale: float
) -> None:
    """weight += scale * (P @ low_rank or low_rank @ P), in place: no full-size temporary."""
    low_rank = low_rank.to(weight.dtype)
    if side == "left":
        weight.addmm_(projector, low_rank, alpha=scale)
    else:
        weight.addmm_(low_rank, projector, alpha=scale)


class GaLore(torch.optim.Optimizer):
    """Runs `make_inner` (an optimizer factory) on low-rank proxies of the GaLore groups' matrices.

    Param groups holding `galore_rank` (and `galore_update_proj_gap`, `galore_scale`,
    `galore_proj_type`) are projected; the other groups are handed to the inner optimizer as they
    are. Outer group i is inner group i, so the learning rate the scheduler sets here is copied in.
    """

    def __init__(self, param_groups: list[dict], make_inner: Callable[[list[dict]], torch.optim.Optimizer]):
        super().__init__(param_groups, defaults={})
        self.side: dict[torch.Tensor, str] = {}
        self.rank: dict[torch.Tensor, int] = {}
        self.proxy: dict[torch.Tensor, torch.Tensor] = {}  # empty between steps
        self.proxy_shape: dict[torch.Tensor, tuple[int, int]] = {}
        inner_groups = []
        for group in self.param_groups:
            if "galore_rank" not in group:
                inner_groups.append({k: v for k, v in group.items() if not k.startswith("galore_")})
                continue
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"GaLore projects matrices; got a parameter of shape {tuple(p.shape)}")
                rank = self.rank[p] = min(group["galore_rank"], *p.shape)  # build_optimizer warns of this
                side = self.side[p] = projection_side(p.shape, group["galore_proj_type"])
                self.proxy_shape[p] = (rank, p.shape[1]) if side == "left" else (p.shape[0], rank)
                self.proxy[p] = p.new_empty(0)
            # Weight decay is applied to the full weight in step(), not to the proxy.
            inner_groups.append(
                {"params": [self.proxy[p] for p in group["params"]], "lr": group["lr"], "weight_decay": 0.0}
            )
        self.inner = make_inner(inner_groups)

    @torch.no_grad()
    def step(self, closure=None):
        for group, inner_group in zip(self.param_groups, self.inner.param_groups, strict=True):
            inner_group["lr"] = group["lr"]
        projected = []
        for group in self.param_groups:
            if "galore_rank" not in group:
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                if state["step"] % group["galore_update_proj_gap"] == 0:
                    state["projector"] = orthonormal_basis(p.grad, self.rank[p], self.side[p])
                proxy = self.proxy[p]
                # The inner optimizer keys its state by this tensor object, so its memory is swapped
                # in and out rather than the tensor replaced. Zeroed: after the step it holds the update.
                proxy.data = p.new_zeros(self.proxy_shape[p])
                proxy.grad = project(p.grad, state["projector"], self.side[p])
                projected.append((p, group))
        self.inner.step()
        for p, group in projected:
            state, proxy = self.state[p], self.proxy[p]
            p.mul_(1 - group["lr"] * group["weight_decay"])
            add_projected_back(p, proxy, state["projector"], self.side[p], group["galore_scale"])
            proxy.grad = None
            proxy.data = p.new_empty(0)
            state["step"] += 1

    def state_dict(self) -> dict:
        saved = super().state_dict()
        saved["inner"] = self.inner.state_dict()
        return saved

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        inner = state_dict.pop("inner")
        super().load_state_dict(state_dict)
        self.inner.load_state_dict(inner)

    def state_tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor this optimizer keeps between steps: the projectors and the inner state."""
        for state in self.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))
        yield from optimizer_state_tensors(self.inner)
