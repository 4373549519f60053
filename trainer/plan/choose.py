"""micro_batch_size=auto, the longest seq_len that fits, and the cheapest changes that make a run fit."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from trainer.errors import ConfigError
from trainer.plan.devices import budget_bytes, resolve_device
from trainer.plan.predict import Plan, predict_peak
from trainer.plan.units import human_bytes

# Beyond this many sequences per micro-batch the search stops, budget or not.
MAX_MICRO_BATCH = 4096


def is_auto(value) -> bool:
    """train.micro_batch_size given as `auto` (however the config spells it once parsed)."""
    return value in ("auto", 0, None)


def resolve_budget(config) -> int:
    """The bytes a run may use: plan.budget, else train.memory_budget, else the device's memory."""
    return budget_bytes(config, resolve_device(config))


def _accumulation(config, micro: int, world_size: int) -> int:
    """The grad_accum_steps a micro-batch implies: what reaches the global batch, else as configured."""
    if config.optim.name.endswith("_layerwise"):
        return 1
    wanted = config.train.global_batch_size
    return max(1, -(-wanted // (micro * world_size))) if wanted else config.train.grad_accum_steps


def _fits(config, micro: int, budget: int, world_size: int) -> tuple[bool, Plan]:
    # With accumulation, later micro-batches run with every gradient alive: plan with the real count.
    plan = predict_peak(
        config, world_size=world_size, micro_batch_size=micro, grad_accum_steps=_accumulation(config, micro, world_size)
    )
    return plan.fits(budget), plan


def largest_fitting_micro_batch(config, budget: int, world_size: int = 1, limit: int = MAX_MICRO_BATCH) -> int:
    """The largest micro-batch (sequences per rank) whose predicted step fits `budget`; 0 if none does.
    The peak grows with the micro-batch at a given accumulation, and going from no accumulation to
    some adds the gradients: the search runs over each micro-batch with the accumulation it implies."""
    if config.train.global_batch_size and limit > 1 and _fits(config, limit, budget, world_size)[0]:
        return limit  # the whole per-rank batch at once: no accumulation
    if not _fits(config, 1, budget, world_size)[0]:
        return 0
    low, high = 1, 2  # low fits; grow high until it does not
    while high <= limit and _fits(config, high, budget, world_size)[0]:
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:  # the peak grows with the micro-batch: bisect
        mid = (low + high) // 2
        if _fits(config, mid, budget, world_size)[0]:
            low = mid
        else:
            high = mid
    return low


def choose_micro_batch(config, budget_bytes: int, world_size: int = 1) -> tuple[int, int, str]:
    """(micro_batch_size, grad_accum_steps, note) for train.micro_batch_size=auto.

    The largest micro-batch whose predicted peak fits `budget_bytes`, and grad_accum_steps so that
    micro_batch_size x grad_accum_steps x world_size = train.global_batch_size (sequences). When
    that global batch is not a multiple of world_size x the micro-batch, the largest micro-batch
    that divides it is taken if it is at least half the largest that fits; otherwise the global
    batch is rounded to the nearest multiple, and the note says so. With global_batch_size=0 the
    configured grad_accum_steps is kept. Layer-wise optimizers cannot accumulate: their
    micro-batch is the whole per-rank batch, or an error says what fits.
    """
    t = config.train
    layerwise = config.optim.name.endswith("_layerwise")
    wanted = t.global_batch_size
    per_rank_limit = MAX_MICRO_BATCH
    if wanted:
        per_rank_limit = max(1, -(-wanted // world_size))
    fit = largest_fitting_micro_batch(config, budget_bytes, world_size, limit=per_rank_limit)
    if fit == 0:
        raise nothing_fits(config, budget_bytes, world_size)
    if not wanted:
        accum = 1 if layerwise else t.grad_accum_steps
        return (
            fit,
            accum,
            (
                f"micro_batch_size=auto: {fit} sequences per rank fit {human_bytes(budget_bytes)} "
                f"(grad_accum_steps={accum}, global batch {fit * accum * world_size} sequences)"
            ),
        )
    per_rank, rounded = divmod(wanted, world_size)
    notes = []
    if rounded:
        per_rank = max(1, round(wanted / world_size))
        notes.append(f"the global batch {wanted} is not a multiple of the {world_size} ranks")
    if layerwise:
        if per_rank > fit:
            raise ConfigError(
                f"optim.name={config.optim.name} cannot accumulate gradients, so each rank's micro-batch must be "
                f"the whole per-rank batch ({per_rank} sequences), but only {fit} fit "
                f"{human_bytes(budget_bytes)}; set train.global_batch_size={fit * world_size} or drop _layerwise"
            )
        micro, accum = per_rank, 1
    else:
        divisor = max(d for d in range(1, fit + 1) if per_rank % d == 0)
        if divisor * 2 >= fit:
            micro, accum = divisor, per_rank // divisor
            if divisor < fit:
                notes.append(
                    f"micro-batch {divisor}, the largest divisor of the {per_rank} sequences per rank "
                    f"(up to {fit} would fit)"
                )
        else:
            micro, accum = fit, max(1, round(per_rank / fit))
            notes.append(f"{per_rank} sequences per rank is not a multiple of the {fit} that fit")
    actual = micro * accum * world_size
    if actual != wanted:
        notes.append(
            f"global batch rounded from {wanted} to {actual} sequences "
            f"({micro} x {accum} accumulation steps x {world_size} ranks)"
        )
    head = (
        f"micro_batch_size=auto: micro_batch_size={micro}, grad_accum_steps={accum} for a global batch of "
        f"{actual} sequences ({fit} per rank fit {human_bytes(budget_bytes)})"
    )
    return micro, accum, head + ("; " + "; ".join(notes) if notes else "")


# ---------------------------------------------------------------- the longest seq_len that fits

# plan.solve=seq_len searches multiples of 128 tokens: the attention kernels' blocks (64 or 128
# rows) and the matmuls' tiles divide them, context lengths are quoted in them, and the answer is
# within 128 tokens of the exact one. With parallel.tiled_mlp=N, multiples of lcm(128, N), which
# N divides.
SEQ_LEN_STEP = 128


@dataclass
class SeqLenAnswer:
    seq_len: int  # the longest multiple of `step` that fits; 0 when not even `step` tokens do
    step: int
    limit: str  # what stops it one step further: "memory" or "model" (ModelArgs.seq_len_problem)
    plan: Plan  # at seq_len (at `step` tokens when nothing fits)
    above: Plan | None = None  # at seq_len + step, when memory is the limit
    problem: str = ""  # the model's words for seq_len + step, when it is the limit


def seq_len_step(config) -> int:
    tiles = config.parallel.tiled_mlp
    return math.lcm(SEQ_LEN_STEP, tiles) if tiles else SEQ_LEN_STEP


def _with_seq_len(config, seq_len: int):
    changed = copy.deepcopy(config)
    changed.train.seq_len = seq_len
    return changed


def longest_seq_len(config, budget: int, world_size: int = 1) -> SeqLenAnswer:
    """The longest train.seq_len, in multiples of seq_len_step(config), whose predicted step fits
    `budget` at the configured micro-batch and accumulation, within the model's own limit
    (ModelArgs.seq_len_problem). The peak grows with the sequence: doubling, then bisection."""
    from trainer.plan.shapes import model_args

    step = seq_len_step(config)
    args = model_args(config)
    problem = args.seq_len_problem(step)
    if problem:
        raise ConfigError(
            f"plan.solve=seq_len searches multiples of {step} tokens, and {step} tokens {problem}; "
            "plan the run with --train.seq_len instead"
        )
    plans: dict[int, Plan] = {}

    def fits(k: int) -> bool:  # k steps of tokens: allowed by the model and within the budget
        if args.seq_len_problem(k * step):
            return False
        plans[k] = predict_peak(_with_seq_len(config, k * step), world_size=world_size)
        return plans[k].fits(budget)

    if not fits(1):
        return SeqLenAnswer(0, step, "memory", plans[1])
    low, high = 1, 2
    while fits(high):
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        if fits(mid):
            low = mid
        else:
            high = mid
    problem = args.seq_len_problem(high * step)
    if problem:
        return SeqLenAnswer(low * step, step, "model", plans[low], problem=problem)
    return SeqLenAnswer(low * step, step, "memory", plans[low], above=plans[high])


def nothing_fits_seq_len(config, answer: SeqLenAnswer, budget: int, world_size: int) -> str:
    """One line when not even answer.step tokens fit: the smallest need and a change that fits."""
    shortest = _with_seq_len(config, answer.step)
    fixes = suggest_changes(shortest, budget, world_size, limit=1)
    hint = (
        f"; it would fit with --train.seq_len={answer.step} {fixes[0].flags} "
        f"({human_bytes(fixes[0].plan.required_bytes)})"
        if fixes
        else "; no change the planner tries makes it fit: use more devices (parallel.strategy=fsdp) or a smaller model"
    )
    return (
        f"nothing fits {human_bytes(budget)}: the smallest predicted need is "
        f"{human_bytes(answer.plan.required_bytes)} at train.seq_len={answer.step}{hint}"
    )


# ---------------------------------------------------------------- what would make it fit


@dataclass
class Suggestion:
    changes: dict[str, object]  # config key -> value
    plan: Plan
    why: str

    @property
    def flags(self) -> str:
        return " ".join(f"--{key}={_flag_value(value)}" for key, value in self.changes.items())


def _flag_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _selective(c):
    if c.parallel.activation_checkpointing == "none":
        return (
            {"parallel.activation_checkpointing": "selective"},
            "recompute the elementwise ops in backward (little extra compute)",
        )


def _smaller_micro_batches(c):
    """Every halving of the micro-batch, the global batch kept by more accumulation."""
    t = c.train
    if c.optim.name.endswith("_layerwise") or t.micro_batch_size <= 1:
        return []
    out, micro = [], t.micro_batch_size
    while micro > 1:
        micro = max(1, micro // 2)
        out.append(
            (
                {
                    "train.micro_batch_size": micro,
                    "train.grad_accum_steps": t.grad_accum_steps * (t.micro_batch_size // micro),
                },
                "the same global batch in smaller micro-batches",
            )
        )
    return out


def _full(c):
    if c.parallel.activation_checkpointing != "full":
        return (
            {"parallel.activation_checkpointing": "full"},
            "recompute each block in backward (about a third more compute)",
        )


def _eight_bit(c):
    name = c.optim.name
    base, suffix = name.removesuffix("_layerwise"), "_layerwise" if name.endswith("_layerwise") else ""
    if base in ("adamw", "galore_adamw"):
        return {"optim.name": base.replace("adamw", "adamw8bit") + suffix}, "8-bit optimizer states"


def _bf16_weights(c):
    if c.train.param_dtype == "fp32" and c.train.dtype != "fp32":
        return {"train.param_dtype": "bf16", "train.dtype": "bf16"}, "bf16 weights (no fp32 master copy)"


def _galore(c):
    name = c.optim.name
    base, suffix = name.removesuffix("_layerwise"), "_layerwise" if name.endswith("_layerwise") else ""
    if not base.startswith(("galore_", "apollo_")) and c.parallel.strategy != "fsdp":
        return {"optim.name": "galore_adamw8bit" + suffix}, "GaLore: low-rank 8-bit optimizer states"


def _layerwise(c):
    t = c.train
    if c.optim.name.endswith("_layerwise") or c.parallel.strategy != "none":
        return None
    base = c.optim.name
    change = {"optim.name": (base if base != "adamw" else "adamw8bit") + "_layerwise", "train.max_grad_norm": 0.0}
    if t.grad_accum_steps > 1:
        change.update({"train.micro_batch_size": t.micro_batch_size * t.grad_accum_steps, "train.grad_accum_steps": 1})
    return change, "update each weight inside backward: one gradient at a time (no clipping, no accumulation)"


def _lora(c):
    lora = getattr(c, "lora", None)
    if lora is not None and lora.rank == 0 and c.model.from_hf:
        return {"lora.rank": 16}, "LoRA adapters of rank 16 instead of full fine-tuning"


# Cheapest first: how much each change slows training or changes what it optimizes.
CHANGES = (_selective, _smaller_micro_batches, _full, _eight_bit, _bf16_weights, _galore, _layerwise, _lora)


def _options(config) -> list[tuple[dict, str]]:
    out = []
    for change in CHANGES:
        found = change(config)
        out.extend(found if isinstance(found, list) else [found] if found else [])
    return out


def _apply(config, changes: dict):
    from trainer.config import set_value

    changed = copy.deepcopy(config)
    for key, value in changes.items():
        set_value(changed, key, _flag_value(value))
    try:
        return changed.validate()
    except ConfigError:
        return None


def suggest_changes(config, budget: int, world_size: int = 1, limit: int = 5) -> list[Suggestion]:
    """The cheapest changes (cheapest first) whose predicted peak fits `budget`. When no single
    change does, the changes applied one on top of the other, in that order, up to the first
    combination that fits."""
    fitting = []
    for changes, why in _options(config):
        changed = _apply(config, changes)
        if changed is not None:
            plan = predict_peak(changed, world_size=world_size)
            if plan.fits(budget):
                fitting.append(Suggestion(changes, plan, why))
    if fitting:
        return _dedupe(fitting)[:limit]
    stack: list[tuple[dict, str]] = []
    current = config
    for change in CHANGES:
        found = change(current)
        found = found[-1] if isinstance(found, list) and found else found  # the smallest micro-batch
        if not found or (changed := _apply(current, found[0])) is None:
            continue
        current = changed
        stack.append(found)
        if predict_peak(current, world_size=world_size).fits(budget):
            return [_minimal(config, stack, budget, world_size)]
    return []


def _stacked(config, stack: list[tuple[dict, str]]):
    changes: dict = {}
    for change, _ in stack:
        changes.update(change)
    return changes, _apply(config, changes)


def _minimal(config, stack: list[tuple[dict, str]], budget: int, world_size: int) -> Suggestion:
    """Drops, cheapest first, each change the others make unnecessary. A change a later one builds
    on (galore_adamw8bit, then galore_adamw8bit_layerwise) stays: the later one includes it."""
    for item in list(stack):
        later, _ = _stacked(config, stack[stack.index(item) + 1 :])
        if any(k in later and str(v) in str(later[k]) for k, v in item[0].items()):
            continue
        rest = [s for s in stack if s is not item]
        changes, changed = _stacked(config, rest)
        if changed is not None and predict_peak(changed, world_size=world_size).fits(budget):
            stack = rest
    changes, changed = _stacked(config, stack)
    return Suggestion(changes, predict_peak(changed, world_size=world_size), "; ".join(why for _, why in stack))


def _dedupe(suggestions: list[Suggestion]) -> list[Suggestion]:
    """Keeps, of the smaller-micro-batch options, only the largest micro-batch that fits."""
    out, micro_seen = [], False
    for s in suggestions:
        if "train.micro_batch_size" in s.changes and "optim.name" not in s.changes:
            if micro_seen:
                continue
            micro_seen = True
        out.append(s)
    return out


class NothingFits(ConfigError):
    """Not even one sequence per micro-batch fits the budget (plan prints it and exits 1)."""


def nothing_fits(config, budget: int, world_size: int) -> NothingFits:
    """The error when even one sequence per micro-batch does not fit."""
    smallest = predict_peak(config, world_size=world_size, micro_batch_size=1)
    hint = ""
    one = copy.deepcopy(config)
    one.train.micro_batch_size = 1
    fixes = suggest_changes(one, budget, world_size, limit=1)
    if fixes:
        hint = f"; it would fit with {fixes[0].flags} ({human_bytes(fixes[0].plan.required_bytes)})"
    return NothingFits(
        f"nothing fits {human_bytes(budget)}: the smallest predicted need is "
        f"{human_bytes(smallest.required_bytes)} at micro_batch_size=1{hint}"
    )
