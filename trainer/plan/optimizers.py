"""Optimizer states, the optimizer step's temporaries, and where gradients go (trainer/optim).

States (kept between steps):
- adamw: two moments in the weight's dtype (torch.optim.AdamW) and a 4-byte step per tensor;
- adamw8bit / paged_adamw8bit (bitsandbytes): two uint8 moments and one fp32 absmax per block of
  256 values for tensors of at least 4096 values, two fp32 moments below that, and two 256-entry
  fp32 quantization maps shared by all tensors;
- adafactor (galore-torch's): an fp32 first moment (optim.betas[0] > 0) and, for a matrix, fp32
  row and column second-moment factors, else a full fp32 second moment;
- galore_*: for each targeted matrix, the projector (rank x its shorter side, std projection) in
  the weight's dtype plus the base optimizer's state over the rank-sized projected gradient;
- apollo_adamw (trainer/optim/apollo.py): AdamW moments in the weight's dtype, for a targeted matrix
  of its rank x longer-side projected gradient, plus the rank x shorter-side random projection and
  a scalar norm.

Step temporaries, read off the code that runs:
- torch AdamW: fused (trainer/optim builds it with fused=True on CPU and CUDA): none;
- bitsandbytes on CPU (`backends/cpu/ops.py`): per tensor, both moments dequantized to fp32, the
  fp32 gradient, sqrt and the denominator (5 fp32 copies; 6 with bf16 weights, whose fp32 copy is
  made too); on CUDA a fused kernel: none;
- Adafactor: per tensor grad**2 and grad**2 + eps (plus fp32 copies of bf16 weights and gradients);
- GaLore (trainer/optim/galore.py): each targeted matrix's zeroed low-rank stand-in and its
  projected gradient, all of them alive during the inner step; every update_proj_gap steps
  (always on the first) an SVD of each gradient: fp32 U, S, Vh plus the copy LAPACK overwrites;
- APOLLO, per tensor: sqrt of the second moment and the normalized update; for a targeted matrix
  the projected gradient, its sqrt and normalized update, then the full-size scaled gradient (and,
  every update_proj_gap steps, the new projection drawn in fp32);
- layer-wise: the same per parameter inside backward, with only that parameter's gradient alive.
"""

from __future__ import annotations

from trainer.optim import APOLLO, parse_name
from trainer.optim.galore import projection_side
from trainer.plan.graph import GRADIENTS, TEMPORARIES, GradSink
from trainer.plan.setting import Setting
from trainer.plan.shapes import Param
from trainer.plan.tape import Tape

STATES = "optimizer states"
F32 = 4
BNB_BLOCK = 256  # bitsandbytes' blockwise quantization: one fp32 absmax per 256 values
BNB_MIN_8BIT = 4096  # smaller tensors keep 32-bit states (Optimizer8bit's min_8bit_size)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class OptimizerModel(GradSink):
    def __init__(self, s: Setting, shard: int = 1):
        self.s = s
        self.shard = shard  # FSDP: each rank holds 1/shard of every parameter, gradient and state
        self.base, self.galore, self.layerwise = parse_name(s.optim.name)
        self.params = {p.name: p for p in s.params}
        self.trained = [p for p in s.params if p.trainable]
        self.grads: dict[str, str] = {}  # parameter -> its .grad storage

    # ---------------------------------------------------------------- shapes

    @property
    def apollo(self) -> bool:
        return self.base == APOLLO

    def projected(self, p: Param) -> bool:
        """A GaLore matrix (trained through a low-rank stand-in)."""
        return self.galore and p.targeted

    def low_rank(self, p: Param) -> tuple[int, tuple[int, int], tuple[int, int]]:
        """(rank, projector shape, projected-gradient shape) of a GaLore or APOLLO matrix."""
        rows, cols = p.shape
        if self.apollo:  # always the shorter side (apollo.py)
            rank = min(self.s.optim.apollo_rank, rows, cols)
            return (rank, (rank, cols), (rows, rank)) if rows >= cols else (rank, (rows, rank), (rank, cols))
        rank = min(self.s.optim.galore_rank, rows, cols)
        side = projection_side(p.shape, self.s.optim.galore_proj_type)
        if side == "left":
            return rank, (rows, rank), (rank, cols)
        return rank, (rank, cols), (rows, rank)

    def itemsize(self, p: Param) -> int:
        """Bytes per value of p, its gradient and AdamW's moments (LoRA adapters are fp32)."""
        return p.itemsize or self.s.param_bytes

    def grad_bytes(self, name: str) -> int:
        p = self.params[name]
        return p.numel * self.itemsize(p) // self.shard

    # ---------------------------------------------------------------- states

    def _base_state(self, shape: tuple[int, ...], itemsize: int) -> int:
        n = 1
        for d in shape:
            n *= d
        if self.base == "adamw":
            return 2 * n * itemsize + F32
        if self.base in ("adamw8bit", "paged_adamw8bit"):
            return 2 * n + 2 * _ceil_div(n, BNB_BLOCK) * F32 if n >= BNB_MIN_8BIT else 2 * n * F32
        if self.base == "adafactor":
            first = n * F32 if self.s.optim.betas[0] else 0
            second = (shape[0] + shape[1]) * F32 if len(shape) == 2 else n * F32
            return first + second
        if self.base == APOLLO:
            return 2 * n * itemsize
        raise ValueError(f"no memory model for optimizer base {self.base!r}")

    def state_bytes(self, p: Param) -> int:
        size = self.itemsize(p)
        if self.shard > 1:  # FSDP accepts adamw only (trainer/config.py)
            return self._base_state(p.shape, size) // self.shard
        if self.apollo and p.targeted:
            _, projection, low = self.low_rank(p)
            return self._base_state(low, size) + projection[0] * projection[1] * size + F32
        if not self.projected(p):
            return self._base_state(p.shape, size)
        _, projector, low = self.low_rank(p)
        return projector[0] * projector[1] * size + self._base_state(low, size)

    def allocate_states(self, tape: Tape) -> None:
        for p in self.trained:
            tape.alloc(f"state.{p.name}", self.state_bytes(p), STATES)
        if self.base in ("adamw8bit", "paged_adamw8bit"):
            tape.alloc("state.qmaps", 2 * 256 * F32, STATES)

    # ---------------------------------------------------------------- step temporaries

    def _base_temp(self, n: int, two_dim: bool, itemsize: int) -> int:
        """Temporaries of one base-optimizer update of an n-value tensor (bytes, at their peak)."""
        cpu = self.s.device == "cpu"
        if self.base == "adamw":  # torch's fused kernel updates in place
            return 0
        if self.base in ("adamw8bit", "paged_adamw8bit"):
            if not cpu:
                return 0
            if n < BNB_MIN_8BIT:
                return 4 * n * F32
            return (5 if itemsize == F32 else 6) * n * F32  # sqrt is freed before the requantization
        if self.base == "adafactor":
            copies = 2 * n * F32 if itemsize != F32 else 0
            return 2 * n * F32 + copies
        if self.base == APOLLO:  # sqrt(v), then m / (sqrt(v) + eps)
            return 2 * n * itemsize
        raise ValueError(self.base)

    def _apollo_temp(self, p: Param) -> int:
        """An APOLLO matrix's update: the projected gradient, sqrt(v) and the normalized update, then
        the scaled full gradient; or, at a projection refresh, the new fp32 draw and its scaled copy."""
        _, projection, low = self.low_rank(p)
        size = self.itemsize(p)
        low_bytes = low[0] * low[1] * size
        draw = projection[0] * projection[1] * (2 * F32 + (size if size != F32 else 0))
        return max(draw, 3 * low_bytes, 2 * low_bytes + p.numel * size)

    def _svd_temp(self, p: Param) -> int:
        rows, cols = p.shape
        k = min(rows, cols)
        rank, projector, _ = self.low_rank(p)
        size = self.itemsize(p)
        outputs = (rows * k + k + k * cols) * F32
        upcast = rows * cols * F32 if size != F32 else 0
        return upcast + outputs + max(rows * cols * F32, projector[0] * projector[1] * size)

    def _low_rank_bytes(self, p: Param) -> int:
        _, _, low = self.low_rank(p)
        return low[0] * low[1] * self.itemsize(p)

    def param_step_temp(self, p: Param) -> int:
        """Layer-wise: the temporaries of updating parameter p alone (inside backward)."""
        if self.apollo and p.targeted:
            return self._apollo_temp(p)
        if not self.projected(p):
            return self._base_temp(p.numel, len(p.shape) == 2, self.itemsize(p))
        low = self._low_rank_bytes(p)
        _, _, shape = self.low_rank(p)
        step = 2 * low + self._base_temp(shape[0] * shape[1], True, self.itemsize(p))
        return max(self._svd_temp(p), step)

    def step(self, tape: Tape) -> None:
        """The optimizer step after backward (not layer-wise): temporaries over the gradients and states."""
        if self.layerwise:
            return
        proxies = []
        if self.galore:
            for p in self.trained:
                if not self.projected(p):
                    continue
                tape.spike(self._svd_temp(p), TEMPORARIES, f"GaLore projector SVD of {p.name}")
                for kind in ("stand-in", "projected gradient"):
                    proxies.append(
                        tape.alloc(
                            tape.fresh(f"galore {kind}"), self._low_rank_bytes(p), TEMPORARIES, what="GaLore step"
                        )
                    )
        # The base optimizer over its groups: the unprojected parameters' groups and the stand-ins.
        sizes = []  # (values, is a matrix, bytes per value) of what the base optimizer updates, one at a time
        for p in self.trained:
            if self.projected(p):
                _, _, low = self.low_rank(p)
                sizes.append((low[0] * low[1], True, self.itemsize(p)))
            else:
                sizes.append((p.numel, len(p.shape) == 2, self.itemsize(p)))
        temp = max(self._base_temp(*size) for size in sizes)
        if self.apollo:
            temp = max([temp] + [self._apollo_temp(p) for p in self.trained if p.targeted])
        tape.spike(temp, TEMPORARIES, f"{self.s.optim.name} step")
        for name in proxies:
            tape.free(name)

    # ---------------------------------------------------------------- gradients

    def grad_ready(self, tape: Tape, param: str, storage: str) -> None:
        tape.recategorize(storage, GRADIENTS)
        if self.layerwise:  # stepped inside backward, then freed (trainer/optim/layerwise.py)
            tape.spike(self.param_step_temp(self.params[param]), TEMPORARIES, f"layer-wise step of {param}")
            tape.free(storage)
        elif param in self.grads:  # accumulating micro-batches: added in place into .grad
            tape.free(storage)
        else:
            self.grads[param] = storage

    def zero_grad(self, tape: Tape) -> None:
        for storage in self.grads.values():
            tape.free(storage)
        self.grads.clear()
