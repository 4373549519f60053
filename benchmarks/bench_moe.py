"""One mixture-of-experts layer, forward and backward, three ways side by side in one process:

- `grouped`: trainer.models.moe.MoE with its experts in two torch._grouped_mm calls;
- `loop`: the same module with the per-expert loop over the sorted token copies (what runs where
  torch._grouped_mm does not);
- `transformers eager` and `transformers grouped_mm`: transformers' MixtralSparseMoeBlock (5.x:
  stacked expert weights) with its two experts implementations: a masked loop iteration per expert
  that received tokens, and its own grouped matmul (what from_pretrained picks by default).

All three start from the same weights and inputs; the script checks that their outputs agree (rel
1e-5) before timing. Per way: the median time of a forward + backward over `--repeats` runs after
`--warmup`, tokens/s, and the peak of live tensor bytes during one forward + backward (the CPU
profiler's memory events, as trainer.plan.measure counts them).

    python benchmarks/bench_moe.py                              # Mixtral-like, 8 experts, top-2
    python benchmarks/bench_moe.py --tokens 4096 --experts 64 --top-k 8 --json moe.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch


def build(args):
    import transformers

    from trainer.models.config import ModelArgs
    from trainer.models.moe import MoE
    from trainer.ops.dispatch import KernelChoice

    config = transformers.MixtralConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    torch.manual_seed(0)
    block = transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock
    theirs = {}
    for implementation in ("eager", "grouped_mm"):
        own = copy.deepcopy(config)
        own._experts_implementation = implementation  # read at each forward
        theirs[implementation] = block(own)
    with torch.no_grad():
        for p in theirs["eager"].parameters():
            p.normal_(0.0, 0.05)
    theirs["grouped_mm"].load_state_dict(theirs["eager"].state_dict())
    model_args = ModelArgs(
        vocab_size=8,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        n_layers=1,
        n_heads=4,
        n_kv_heads=4,
        n_experts=args.experts,
        experts_per_token=args.top_k,
    )
    ours = MoE(model_args, KernelChoice())
    ours.load_state_dict(theirs["eager"].state_dict())  # the same names and layouts as transformers 5
    return ours, theirs


def forward_backward(module, x, grad):
    x = x.detach().requires_grad_()
    out = module(x)
    if isinstance(out, tuple):  # ours also returns its routing figures
        out = out[0]
    out.backward(grad)
    return out


def peak_bytes(fn) -> int:
    """The most tensor bytes allocated during fn() and alive at once (the weights, made before, not included)."""
    from trainer.plan.measure import STEP_MARK, replay

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.profiler.record_function(STEP_MARK):
            fn()
    return replay(prof.profiler.kineto_results.experimental_event_tree()).peak_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import trainer.ops.grouped_mm as moe

    ours, theirs = build(args)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, args.tokens, args.hidden, generator=g)
    grad = torch.randn(1, args.tokens, args.hidden, generator=g)
    always_grouped = moe.grouped_mm_supported

    def never(x, weight):
        return False

    ways = {
        "grouped": (ours, always_grouped),
        "loop": (ours, never),
        "transformers eager": (theirs["eager"], always_grouped),
        "transformers grouped_mm": (theirs["grouped_mm"], always_grouped),
    }
    reference = None
    results = {}
    for name, (module, supported) in ways.items():
        moe.grouped_mm_supported = supported
        out = forward_backward(module, x, grad).detach()
        if reference is None:
            reference = out
        err = ((out - reference).norm() / reference.norm()).item()
        if err > 1e-5:
            raise SystemExit(f"{name} differs from grouped by {err:.2e}")
        for _ in range(args.warmup):
            forward_backward(module, x, grad)
        times = []
        for _ in range(args.repeats):
            module.zero_grad(set_to_none=True)
            start = time.perf_counter()
            forward_backward(module, x, grad)
            times.append(time.perf_counter() - start)
        module.zero_grad(set_to_none=True)
        peak = peak_bytes(lambda module=module: forward_backward(module, x, grad))
        seconds = statistics.median(times)
        results[name] = {"seconds": seconds, "tokens_per_s": args.tokens / seconds, "peak_bytes": peak}
    moe.grouped_mm_supported = always_grouped

    base = results["grouped"]
    print(
        f"{args.tokens} tokens, hidden {args.hidden}, {args.experts} experts of {args.intermediate}, top-{args.top_k}"
    )
    for name, r in results.items():
        print(
            f"  {name:24s} {r['seconds'] * 1e3:8.1f} ms  {r['tokens_per_s']:10,.0f} tok/s  "
            f"peak {r['peak_bytes'] / 2**20:7.1f} MiB  time x{r['seconds'] / base['seconds']:.2f} of grouped"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
