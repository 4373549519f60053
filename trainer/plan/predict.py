"""predict_peak: the peak memory of one training step, replayed from the configuration alone.

One optimizer step is replayed on a Tape in the loop's order (trainer/loop.py): the data batches,
then per micro-batch the forward (embedding, blocks, final norm, loss), backward (loss, blocks in
reverse, embedding), and after the last micro-batch the optimizer step and zero_grad. The state at
the start is the steady state of a run: parameters, the model's rotary tables and the optimizer
states exist; gradients do not (zero_grad frees them). Two micro-batches are replayed when there
is accumulation: from the second on, every gradient already exists. The peak is the largest total
at any moment, with what was alive then.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from trainer.ops.cross_entropy import chunk_peak_bytes
from trainer.plan.devices import (
    CPU_RUNTIME_BYTES,
    CUDA_CONTEXT_BYTES,
    Device,
    allocator_slack,
    budget_bytes,
    cpu_rss_bytes,
    library_workspace_bytes,
    peak_within,
)
from trainer.plan.graph import ACTIVATIONS, Graph
from trainer.plan.model import (
    LOSS_OP,
    batch_bytes,
    block_ops,
    ce_chunk,
    embedding_ops,
    logits_materialized,
    loss_ops,
    param_uses,
    per_batch_position_bytes,
    rotary_table_bytes,
)
from trainer.plan.optimizers import OptimizerModel
from trainer.plan.setting import Setting, make_setting
from trainer.plan.tape import Tape

PARAMETERS = "parameters"
BUFFERS = "model buffers"
DATA = "data batches"
FSDP_GATHERED = "FSDP gathered parameters and gradients"
DDP_BUCKETS = "DDP gradient buckets"


@dataclass
class Plan:
    """The predicted peak of one step: `peak_bytes` is what the allocator counts (on CUDA,
    torch.cuda.max_memory_allocated; on CPU, the bytes of live tensors); `overheads` is the device
    memory needed beyond it (CUDA context, allocator slack)."""

    peak_bytes: int
    breakdown: dict[str, int]
    phase: str  # where the peak happens: forward, backward, optimizer step
    at: str  # the op at the peak
    phase_peaks: dict[str, int]
    overheads: dict[str, int] = field(default_factory=dict)
    device: str = "cpu"
    micro_batch_size: int = 1
    grad_accum_steps: int = 1
    world_size: int = 1
    tensor_parallel: int = 1
    parameters: int = 0  # one rank's under tensor parallelism
    compute_dtype: str = ""  # train.dtype as resolved for the device (auto -> bf16 on a GPU)
    # parallel.activation_offloading on CUDA: the most pinned host memory the offloaded saved
    # tensors take at once (one micro-batch's, at the end of its forward); not in peak_bytes
    host_bytes: int = 0
    # The fused loss's tokens per chunk, and what the shape alone would give (more when the memory
    # left for the chunks caps them: ce_chunk_bytes, KernelChoice's); 0 with materialised logits
    ce_chunk_tokens: int = 0
    ce_shape_chunk_tokens: int = 0
    ce_chunk_bytes: int = 0
    # The fused loss computes these logits whole, as small as they are (logits_materialized by the
    # op's own choice, not kernels.fused_ce=false)
    logits_whole: bool = False
    # On CPU, the process's predicted peak resident memory (RSS): the runtime, the run's build, the
    # tensors and the heap the allocator keeps (trainer.plan.devices.cpu_rss_bytes); 0 on a GPU
    rss_bytes: int = 0

    @property
    def required_bytes(self) -> int:
        """Device memory the run needs: the peak plus what the allocator does not count."""
        return self.peak_bytes + sum(self.overheads.values())

    def fits(self, budget: int) -> bool:
        return self.required_bytes <= budget

    def to_dict(self) -> dict:
        return {
            "peak_bytes": self.peak_bytes,
            "required_bytes": self.required_bytes,
            "breakdown": self.breakdown,
            "overheads": self.overheads,
            "peak_phase": self.phase,
            "peak_at": self.at,
            "phase_peaks": self.phase_peaks,
            "device": self.device,
            "compute_dtype": self.compute_dtype,
            "micro_batch_size": self.micro_batch_size,
            "grad_accum_steps": self.grad_accum_steps,
            "world_size": self.world_size,
            "tensor_parallel": self.tensor_parallel,
            "parameters": self.parameters,
            "host_bytes": self.host_bytes,
            "ce_chunk_tokens": self.ce_chunk_tokens,
            "ce_shape_chunk_tokens": self.ce_shape_chunk_tokens,
            "ce_chunk_bytes": self.ce_chunk_bytes,
            "logits_whole": self.logits_whole,
            "rss_bytes": self.rss_bytes,
        }


def predict_peak(
    config,
    world_size: int = 1,
    *,
    micro_batch_size: int | None = None,
    grad_accum_steps: int | None = None,
    device: str | None = None,
) -> Plan:
    """The predicted peak memory of one training step of `config`, per rank with `world_size` ranks.

    device: a device name (trainer.plan.devices.DEVICE_NAMES) instead of plan.device; it decides
    which kernels run (Triton on CUDA) and what is counted. micro_batch_size replaces
    train.micro_batch_size and grad_accum_steps train.grad_accum_steps (for `auto`).
    """
    s, dev = run_setting(
        config, world_size, micro_batch_size=micro_batch_size, grad_accum_steps=grad_accum_steps, device=device
    )
    return simulate(s, dev.name)


# A chunk the memory left caps is never smaller than this many tokens: below it each chunk's
# weight-gradient GEMM reads and writes the whole (vocab x hidden) fp32 buffer for a handful of
# rows, and the loss slows by orders of magnitude to save bytes that are then a small part of the
# step (at 128 tokens an 8B Llama's two bf16 chunk buffers take 63 MiB).
MIN_CAPPED_CHUNK_TOKENS = 128


def run_setting(
    config,
    world_size: int = 1,
    *,
    micro_batch_size: int | None = None,
    grad_accum_steps: int | None = None,
    device: str | None = None,
) -> tuple[Setting, Device]:
    """The Setting the run will have, and its device: the configuration read off (make_setting),
    and the fused loss's chunk cap that trainer/build.py gives the model (ce_chunk_budget)."""
    from trainer.plan.devices import resolve_device

    dev = resolve_device(config, device)
    s = make_setting(config, dev.kind, world_size=world_size, micro_batch=micro_batch_size)
    if grad_accum_steps is not None:
        s.grad_accum = grad_accum_steps
    if has_budget(config, dev):
        s.kernels = replace(s.kernels, ce_chunk_bytes=ce_chunk_budget(s, budget_bytes(config, dev), dev.name))
    return s, dev


def loss_chunk_bytes(config, world_size: int = 1) -> int:
    """KernelChoice.ce_chunk_bytes for the configured run (trainer/build.py hands it to the model):
    the cap run_setting plans with, 0 where there is no budget or it does not bind."""
    from trainer.plan.devices import resolve_device

    if not has_budget(config, resolve_device(config)):
        return 0
    return run_setting(config, world_size)[0].kernels.ce_chunk_bytes


def loss_logits_whole(config, world_size: int = 1) -> bool:
    """Whether the run's fused loss computes its logits whole, as small as they are (Plan.logits_whole)."""
    s = run_setting(config, world_size)[0]
    return logits_materialized(s) and not s.kernels.materialize_logits


def has_budget(config, dev: Device) -> bool:
    """Whether the run has a memory limit to size the loss's chunks by: a GPU's memory, or a budget
    given (plan.budget, train.memory_budget). A CPU run without one sizes them from the shape: its
    limit is the machine's RAM, shared with everything else the machine runs."""
    return dev.kind == "cuda" or bool(config.plan.budget or config.train.memory_budget)


def ce_chunk_budget(s: Setting, budget: int, device_name: str = "") -> int:
    """KernelChoice.ce_chunk_bytes for setting `s` within `budget` bytes: the room the loss's chunks
    have, the largest peak the budget allows minus what the step replayed without them holds while
    the loss runs (at least MIN_CAPPED_CHUNK_TOKENS tokens' worth); 0 (the shape's chunk) when that
    room does not make the chunk smaller, or the logits are materialised. The moment of the loss,
    not the step's peak: a step whose backward goes over the budget does not fit with any chunk,
    and shrinking the loss's chunks for it would only slow it."""
    if logits_materialized(s):
        return 0
    tape, _ = replay(replace(s, loss_chunks=False), device_name)
    room = peak_within(budget, s.device) - tape.op_peaks[LOSS_OP]
    shape_tokens, kept, working = ce_chunk(replace(s, kernels=replace(s.kernels, ce_chunk_bytes=0)))
    if room >= chunk_peak_bytes(s.tokens, shape_tokens, kept, working):
        return 0
    cap = max(room, MIN_CAPPED_CHUNK_TOKENS * (kept + working))
    return cap if cap // (kept + working) < shape_tokens else 0


def simulate(s: Setting, device_name: str = "") -> Plan:
    tape, host = replay(s, device_name)
    peak = tape.peak
    if s.device == "cuda":
        overheads = {
            "CUDA context (outside the allocator)": CUDA_CONTEXT_BYTES,
            "allocator slack (assumed)": allocator_slack(peak.bytes),
        }
    else:
        overheads = {"Python and torch runtime": CPU_RUNTIME_BYTES}
    return Plan(
        peak_bytes=peak.bytes,
        breakdown=dict(sorted(peak.breakdown.items(), key=lambda kv: -kv[1])),
        phase=peak.phase,
        at=peak.what,
        phase_peaks={k: v.bytes for k, v in tape.phase_peaks.items()},
        overheads=overheads,
        device=device_name or s.device,
        micro_batch_size=s.micro_batch,
        grad_accum_steps=s.grad_accum,
        world_size=s.world_size,
        tensor_parallel=s.tensor_parallel,
        parameters=sum(p.numel for p in s.params),
        compute_dtype=s.compute_dtype,
        host_bytes=host.peak,
        rss_bytes=cpu_rss_bytes(peak.bytes, tape.allocated, uses_bitsandbytes(s)) if s.device == "cpu" else 0,
        **_chunk_fields(s),
    )


def uses_bitsandbytes(s: Setting) -> bool:
    """An 8-bit optimizer or an nf4 base: the run imports bitsandbytes."""
    return "8bit" in s.optim.name or (s.lora is not None and s.lora.quantize == "nf4")


def replay(s: Setting, device_name: str = "") -> tuple[Tape, _Host]:
    """One step of `s` on a fresh Tape: the tape (its peak, each phase's and each op's) and the
    pinned host memory of offloaded activations."""
    tape = Tape()
    fsdp = s.strategy == "fsdp" and s.data_parallel > 1
    shard = s.data_parallel if fsdp else 1
    opt = OptimizerModel(s, shard=shard)
    tape.set_phase("between steps")
    if not (fsdp and s.fsdp_offload):
        for p in s.params:
            tape.alloc(f"param.{p.name}", p.nbytes(s.param_bytes) // shard, PARAMETERS)
        opt.allocate_states(tape)
    tape.alloc("rotary tables", rotary_table_bytes(s), BUFFERS)
    if s.device == "cuda":
        tape.alloc("CUDA library workspaces", library_workspace_bytes(device_name), BUFFERS)
    if s.strategy == "ddp" and s.world_size > 1:
        # DDP copies every gradient into its buckets (gradient_as_bucket_view=False, the default).
        tape.alloc("ddp buckets", sum(p.numel for p in s.params) * s.param_bytes, DDP_BUCKETS)
    if fsdp:
        tape.alloc("fsdp gathered", _fsdp_gathered_bytes(s), FSDP_GATHERED)
    graph = Graph(tape, opt, param_uses(s), opt.grad_bytes, {p.name for p in s.params if p.trainable})
    if s.device == "cpu":  # the loop draws all micro-batches of the step at once, on the host
        tape.alloc("batches", s.grad_accum * batch_bytes(s), DATA)
    host = _Host()
    for micro in range(min(s.grad_accum, 2)):
        if s.device == "cuda":
            tape.alloc(f"batch{micro}", batch_bytes(s), DATA)
        _forward_backward(s, graph, tape, micro, host)
        if s.device == "cuda":
            tape.free(f"batch{micro}")
    tape.set_phase("optimizer step")
    opt.step(tape)
    opt.zero_grad(tape)
    return tape, host


def _chunk_fields(s: Setting) -> dict[str, int | bool]:
    if logits_materialized(s):
        return {"logits_whole": not s.kernels.materialize_logits}
    shape_tokens = ce_chunk(replace(s, kernels=replace(s.kernels, ce_chunk_bytes=0)))[0]
    return {
        "ce_chunk_tokens": ce_chunk(s)[0],
        "ce_shape_chunk_tokens": shape_tokens,
        "ce_chunk_bytes": s.kernels.ce_chunk_bytes,
    }


class _Host:
    """Pinned host memory of offloaded activations: now and at most."""

    def __init__(self):
        self.now = self.peak = 0

    def add(self, nbytes: int) -> None:
        self.now += nbytes
        self.peak = max(self.peak, self.now)


def _offload_block(s: Setting, graph: Graph, ops, ns: dict[str, str], prefix: str, host: _Host) -> dict[str, int]:
    """trainer.parallel.offload after a block's forward: what its ops keep for backward (with
    checkpointing, the block's input, which the checkpoint keeps), of offload_min_bytes or more,
    leaves the device for pinned host memory. Weights and their autocast copies are not among the
    saved activations here; selective checkpointing's kept matmul outputs are held by the
    checkpoint, not saved through the hooks, and stay. Returns storage -> bytes moved."""
    if s.checkpointing == "none":
        storages = dict.fromkeys(ns[name] for op in ops for name in graph.kept.get((prefix, op.name), ()))
    else:
        storages = {ns["x"]: None}
    moved = {}
    for storage in storages:
        if tape_size(graph, storage) >= s.offload_min_bytes:
            nbytes = graph.offload(storage)
            if nbytes:
                moved[storage] = nbytes
    host.add(sum(moved.values()))
    return moved


def tape_size(graph: Graph, storage: str) -> int:
    return graph.tape.size(storage) if graph.tape.alive(storage) else 0


def _fetch_blocks(graph: Graph, moved: list[dict[str, int]], i: int) -> None:
    """Block i's backward begins: its tensors come back, and block i - 1's are prefetched."""
    for block in (i, i - 1):
        if block >= 0:
            for storage in moved[block]:
                graph.fetch(storage)


def _forward_backward(s: Setting, graph: Graph, tape: Tape, micro: int, host: _Host) -> None:
    mode = s.checkpointing
    offload = s.offload and s.device == "cuda"  # on CPU the hooks pass every tensor through
    moved: list[dict[str, int]] = []
    tape.set_phase("forward")
    positions = per_batch_position_bytes(s)
    if positions:
        tape.alloc(f"positions{micro}", positions, ACTIVATIONS)
    ns_embed: dict[str, str] = {}
    graph.forward(embedding_ops(s), ns_embed, f"m{micro}.embed.", exports=("x",))
    x = ns_embed["x"]
    blocks = []
    for i in range(s.args.n_layers):
        ops = block_ops(s, i)
        ns = {"x": x}
        prefix = f"m{micro}.L{i}."
        if mode == "none":
            graph.forward(ops, ns, prefix, exports=("out",))
            cached = None
        else:  # the checkpoint keeps the block's input (and, selective, the matmul/attention outputs)
            graph.hold(x)
            kept: list[str] = []
            graph.forward(
                ops,
                ns,
                prefix,
                keep_saves=False,
                exports=("out",),
                keep_outputs_of_must_save=kept if mode == "selective" else None,
            )
            cached = {local: ns[local] for op in ops if op.must_save for local in op.outputs} if kept else None
        blocks.append((ops, ns, cached))
        moved.append(_offload_block(s, graph, ops, ns, prefix, host) if offload else {})
        x = ns["out"]
    ns_loss = {"x": x}
    graph.forward(loss_ops(s), ns_loss, f"m{micro}.loss.")
    graph.end_autocast()

    tape.set_phase("backward")
    graph.seed_grad(ns_loss["loss"], 4)
    graph.backward(loss_ops(s), ns_loss, f"m{micro}.loss.")
    for i in reversed(range(s.args.n_layers)):
        ops, ns, cached = blocks[i]
        _fetch_blocks(graph, moved, i)
        if mode == "none":
            graph.backward(ops, ns, f"m{micro}.L{i}.")
            host.now -= sum(moved[i].values())  # its saved tensors, host copies and all, are released
            continue
        # Backward reaches a checkpointed block: its forward runs again, keeping what backward needs.
        rerun = {"x": ns["x"], "out": ns["out"]}
        ran = graph.forward(ops, rerun, f"m{micro}.L{i}r.", cached=cached, stop_after_last_save=True)
        replayed = {local for op in ran for local in op.outputs}
        for local, storage in ns.items():  # ops not re-run: their gradients still flow by these names
            rerun.setdefault(local, storage)
        later = [storage for local, storage in (cached or {}).items() if local not in replayed]
        graph.end_autocast()
        graph.backward(ops, rerun, f"m{micro}.L{i}r.")
        for storage in later:
            graph.release(storage)
        graph.release(ns["x"])
        host.now -= sum(moved[i].values())
    graph.backward(embedding_ops(s), ns_embed, f"m{micro}.embed.")
    if positions:
        tape.free(f"positions{micro}")


def _fsdp_gathered_bytes(s: Setting) -> int:
    """FSDP2 per rank: the root's parameters (embedding, final norm, an untied head) gathered through
    forward and backward, two blocks gathered at once (the current one and the prefetched next),
    and one block's unsharded gradients with their fp32 copy for the reduce-scatter. An nf4 base is
    gathered in its 4-bit storage (torchao's FSDP2 hooks) and a frozen weight has no gradient. Not
    measured."""
    gathered = s.compute_bytes if s.autocast else s.param_bytes

    def gathered_bytes(params: list) -> int:
        return sum(p.nbytes(s.param_bytes) if p.nf4 else p.numel * gathered for p in params)

    block = [p for p in s.params if p.name.startswith("model.layers.0.")]
    root = gathered_bytes([p for p in s.params if not p.name.startswith("model.layers.")])
    per_block = gathered_bytes(block)
    block_grads = sum(p.numel for p in block if p.trainable) * (gathered + 4)
    if not s.fsdp_reshard:
        return root + s.args.n_layers * per_block + block_grads
    return root + 2 * per_block + block_grads
