"""Activation offloading (`parallel.activation_offloading=true`): what each decoder block saves for
backward waits in pinned host memory instead of on the GPU, and comes back for the block's backward.

Each block's forward runs under `torch.autograd.graph.saved_tensors_hooks`. The pack hook copies a
saved tensor to a pinned host buffer on a side CUDA stream, so the copy overlaps the block's
compute; the unpack hook hands back a device copy. When the first saved tensor of block i is
unpacked (its backward has begun), all of block i's tensors are brought back, if not already, and
block i - 1's are prefetched on the side stream, so they travel while block i's backward computes.
On the device at any moment in backward: the tensors of two blocks, not of all of them.
(torch.autograd.graph.save_on_cpu and torchtune's OffloadActivations do the same in their own
ways; this is our code.)

Which saved tensors travel: those of MIN_OFFLOAD_BYTES or more. Smaller ones (RMSNorm's rstd, 4
bytes a token; attention's log-sum-exp at short sequences) stay: a transfer that small costs its
launch, event and pinned buffer (some 10 us) more than the bandwidth it uses, and frees next to
nothing beside the (tokens x hidden) activations, several MiB each from a few thousand tokens on.
Also kept on the device, whatever their size: parameters (and views of them, such as the
transposed weight a matmul saves) and autocast's cast copies of parameters, which live for the
whole step anyway and would cross PCIe every step; and the block's shared inputs (the rotary
cos/sin tables and the attention mask that every block receives), which are alive for the whole
forward. A tensor saved twice in one block (the normed input of q, k and v) travels once.

Exactness: the values come back bit for bit, so the loss and gradients are those without
offloading. Checkpointing composes: the hooks wrap the checkpointed forward, so under `full`
(and `selective`) checkpointing what the block saves through them are its inputs (the matmul
outputs that `selective` keeps are held by the checkpoint itself and stay on the device).

On CPU there is nowhere to offload to: the hooks run, count what they handle (OffloadStats) and
pass every tensor through unchanged. Memory is saved only on CUDA.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

MIN_OFFLOAD_BYTES = 1 << 20  # 1 MiB: see the module docstring


@dataclass
class OffloadStats:
    """What the hooks did since the model was wrapped (all blocks, all steps)."""

    packed: int = 0  # saved tensors handed to the pack hook
    offloaded: int = 0  # of those, sent to the host (on CPU: passed through by the same path)
    offloaded_bytes: int = 0
    deduplicated: int = 0  # saved again in the same block: the earlier copy serves
    kept: int = 0  # below the threshold, parameters, their autocast copies, the blocks' shared inputs
    unpacked: int = 0  # saved tensors handed back to backward
    fetched_groups: int = 0  # blocks brought back (on demand or prefetched)
    prefetched_groups: int = 0  # of those, fetched ahead of their own backward


class PassThrough:
    """The mover where there is no host to move to (CPU): every tensor stays where it is."""

    device_type = None  # any device's tensors take the same path (and stay)

    def store(self, tensor: torch.Tensor):
        return tensor

    def fetch(self, stored, device: torch.device):
        return stored

    def take(self, fetched) -> torch.Tensor:
        return fetched


class CudaMover:
    """Device -> pinned host and back on one side stream, ordered against the compute stream by events."""

    device_type = "cuda"  # a CPU tensor saved in a CUDA run stays where it is

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device)

    @torch.no_grad()  # the copies are data, not part of the graph (the pack hook runs in forward)
    def store(self, tensor: torch.Tensor):
        host = torch.empty_like(tensor, device="cpu", pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor has been computed
        with torch.cuda.stream(self.stream):
            host.copy_(tensor, non_blocking=True)
        # The allocator must not hand this memory out again before the side stream has read it.
        tensor.record_stream(self.stream)
        return host

    @torch.no_grad()
    def fetch(self, host: torch.Tensor, device: torch.device):
        with torch.cuda.stream(self.stream):  # after the host copy: the same stream, in order
            back = host.to(device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return back, done

    def take(self, fetched) -> torch.Tensor:
        back, done = fetched
        compute = torch.cuda.current_stream(back.device)
        compute.wait_event(done)
        back.record_stream(compute)  # made on the side stream, used (and freed) on the compute stream
        return back


class _Handle:
    """One offloaded tensor: its host copy, the device copy while backward needs it, and how many
    saved-tensor slots still have to unpack it."""

    __slots__ = ("group", "stored", "device", "fetched", "uses", "__weakref__")

    def __init__(self, group: _Group, stored, device: torch.device):
        self.group, self.stored, self.device = group, stored, device
        self.fetched = None
        self.uses = 1


class _Group:
    """The tensors one block's forward offloaded, and the block before it (for the prefetch)."""

    def __init__(self, offload: ActivationOffload, keep: set[tuple[int, int]], previous: _Group | None):
        self.offload = offload
        self.keep = keep  # (device, storage pointer) of the block's shared inputs
        self.previous = weakref.ref(previous) if previous is not None else None
        # Weak: a handle (and its host copy) lives as long as autograd's saved slots hold it, and a
        # strong list here would make a cycle (each handle refers to its group) that only the
        # garbage collector frees, keeping every saved tensor past its backward.
        self.handles: list[weakref.ref] = []
        self.index: dict[tuple, _Handle] | None = {}  # open while the block's forward runs
        self.alive: list[torch.Tensor] = []  # the device tensors, until the forward ends (see close)
        self.fetched = False  # its tensors are on their way back (on demand or prefetched)
        self.started = False  # its backward has taken a tensor

    def pack(self, tensor: torch.Tensor):
        stats = self.offload.stats
        stats.packed += 1
        if not self._travels(tensor):
            stats.kept += 1
            return tensor
        key = _view_key(tensor)
        handle = self.index.get(key) if self.index is not None else None
        if handle is not None:
            handle.uses += 1
            stats.deduplicated += 1
            return handle
        handle = _Handle(self, self.offload.mover.store(tensor), tensor.device)
        self.handles.append(weakref.ref(handle))
        if self.index is not None:
            self.index[key] = handle
            # Held until the forward ends: while the key is in the index, its memory must not be
            # reused by another tensor of this block, which would then match it.
            self.alive.append(tensor)
        stats.offloaded += 1
        stats.offloaded_bytes += tensor.numel() * tensor.element_size()
        return handle

    def _travels(self, tensor: torch.Tensor) -> bool:
        if tensor.numel() * tensor.element_size() < self.offload.min_bytes:
            return False
        if getattr(self.offload.mover, "device_type", None) not in (None, tensor.device.type):
            return False
        if _is_weight(tensor):
            return False
        return (tensor.device.index, tensor.untyped_storage().data_ptr()) not in self.keep

    def close(self) -> None:
        """The block's forward is over: the device tensors are the graph's (or nobody's) from here."""
        self.index = None
        self.alive = []

    def fetch(self) -> None:
        if self.fetched:
            return
        self.fetched = True
        mover = self.offload.mover
        for ref in self.handles:
            handle = ref()
            if handle is not None and handle.uses > 0 and handle.fetched is None:
                handle.fetched = mover.fetch(handle.stored, handle.device)
        self.offload.stats.fetched_groups += 1

    def unpack(self, handle: _Handle) -> torch.Tensor:
        if not self.started:  # this block's backward has begun: its tensors back, the previous block's on the way
            self.started = True
            self.fetch()
            previous = self.previous() if self.previous is not None else None
            if previous is not None and not previous.fetched and previous.handles:
                previous.fetch()
                self.offload.stats.prefetched_groups += 1
        self.offload.stats.unpacked += 1
        if handle.fetched is None:  # unpacked again after its last use (retain_graph): fetched anew
            handle.fetched = self.offload.mover.fetch(handle.stored, handle.device)
        tensor = self.offload.mover.take(handle.fetched)
        handle.uses -= 1
        if handle.uses <= 0:
            handle.fetched = None  # the device copy goes with backward's last reference to it
        return tensor


def _is_weight(tensor: torch.Tensor) -> bool:
    """A parameter, a view of one (a matmul saves weight.t()), or autocast's cast copy of one."""
    base = tensor._base if tensor._base is not None else tensor
    if isinstance(base, nn.Parameter):
        return True
    fn = base.grad_fn
    if fn is not None and fn.name() == "ToCopyBackward0":
        source = fn.next_functions[0][0]
        return source is not None and isinstance(getattr(source, "variable", None), nn.Parameter)
    return False


def _view_key(tensor: torch.Tensor) -> tuple:
    return (
        tensor.device,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
    )


def _storages(values) -> set[tuple[int, int]]:
    return {
        (v.device.index, v.untyped_storage().data_ptr())
        for v in values
        if isinstance(v, torch.Tensor) and v.device.type != "meta"
    }


class ActivationOffload:
    """The hooks of every block of one model; `stats` counts what they did."""

    def __init__(self, mover, min_bytes: int = MIN_OFFLOAD_BYTES):
        self.mover = mover
        self.min_bytes = min_bytes
        self.stats = OffloadStats()
        self._last: weakref.ref | None = None  # the group of the block that ran forward last

    def wrap(self, forward):
        def offloaded_forward(x, *args, **kwargs):
            if not torch.is_grad_enabled():  # nothing is saved (evaluation, generation)
                return forward(x, *args, **kwargs)
            previous = self._last() if self._last is not None else None
            group = _Group(self, _storages((*args, *kwargs.values())), previous)
            self._last = weakref.ref(group)
            with torch.autograd.graph.saved_tensors_hooks(group.pack, _unpack):
                try:
                    return forward(x, *args, **kwargs)
                finally:
                    group.close()

        return offloaded_forward


def _unpack(packed):
    return packed.group.unpack(packed) if isinstance(packed, _Handle) else packed


def apply_activation_offloading(
    model: nn.Module, device: torch.device, min_bytes: int = MIN_OFFLOAD_BYTES, mover=None
) -> ActivationOffload:
    """Wraps every block of `model.model.layers` (after checkpointing has replaced their forward,
    so the hooks see what the checkpoint saves, and after compile). `mover` defaults to pinned host memory on CUDA and
    a pass-through elsewhere. The returned object (also `model.activation_offload`) holds the stats."""
    if mover is None:
        mover = CudaMover(device) if torch.device(device).type == "cuda" else PassThrough()
    offload = ActivationOffload(mover, min_bytes)
    for block in model.model.layers:
        if getattr(block, "_compiled_call_impl", None) is not None:
            # A compiled block (Module.compile): the hooks go around the compiled call, where they
            # apply to what its compiled autograd function saves; dynamo cannot trace their
            # bookkeeping (storage pointers) inside the graph.
            block._compiled_call_impl = offload.wrap(block._compiled_call_impl)
        else:
            # An instance attribute, like checkpointing's: parameter names and module hooks stay as they are.
            block.forward = offload.wrap(block.forward)
    model.activation_offload = offload
    return offload
