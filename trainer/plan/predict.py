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

from dataclasses import dataclass, field

from trainer.plan.devices import CPU_RUNTIME_BYTES, CUDA_CONTEXT_BYTES, allocator_slack, library_workspace_bytes
from trainer.plan.graph import ACTIVATIONS, Graph
from trainer.plan.model import (
    batch_bytes,
    block_ops,
    embedding_ops,
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
    parameters: int = 0
    compute_dtype: str = ""  # train.dtype as resolved for the device (auto -> bf16 on a GPU)
    # parallel.activation_offloading on CUDA: the most pinned host memory the offloaded saved
    # tensors take at once (one micro-batch's, at the end of its forward); not in peak_bytes
    host_bytes: int = 0

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
            "parameters": self.parameters,
            "host_bytes": self.host_bytes,
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
    from trainer.plan.devices import resolve_device

    dev = resolve_device(config, device)
    s = make_setting(config, dev.kind, world_size=world_size, micro_batch=micro_batch_size)
    if grad_accum_steps is not None:
        s.grad_accum = grad_accum_steps
    return simulate(s, dev.name)


def simulate(s: Setting, device_name: str = "") -> Plan:
    tape = Tape()
    fsdp = s.strategy == "fsdp" and s.world_size > 1
    shard = s.world_size if fsdp else 1
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
        parameters=sum(p.numel for p in s.params),
        compute_dtype=s.compute_dtype,
        host_bytes=host.peak,
    )


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
    and one block's unsharded gradients with their fp32 copy for the reduce-scatter. Not measured."""
    gathered = s.compute_bytes if s.autocast else s.param_bytes
    block = [p.numel for p in s.params if p.name.startswith("model.layers.0.")]
    root = sum(p.numel for p in s.params if not p.name.startswith("model.layers."))
    per_block = sum(block)
    if not s.fsdp_reshard:
        return root * gathered + s.args.n_layers * per_block * gathered + per_block * (gathered + 4)
    return root * gathered + 2 * per_block * gathered + per_block * (gathered + 4)
