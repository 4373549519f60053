"""Activation offloading (parallel.activation_offloading, trainer/parallel/offload.py).

On CPU nothing moves (the pass-through mover), so these tests check what the hooks handled and
that the gradients are those without offloading. A test-only mover that really copies each stored
tensor and hands back another copy stands in for the host round trip: if backward used anything
but what came back, or in the wrong order, the gradients would differ. The CUDA path is checked
by the `gpu` test at the end (not run on this machine)."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

from trainer.models import build
from trainer.parallel import apply_activation_checkpointing, apply_activation_offloading, apply_tiled_mlp
from trainer.parallel.offload import MIN_OFFLOAD_BYTES, PassThrough


class CopyingMover:
    """Stores a copy, fetches another: the host round trip without a host. Records the order."""

    def __init__(self):
        self.stored: list[torch.Tensor] = []
        self.fetches: list[int] = []  # ids of the stored copies, in fetch order

    def store(self, tensor):
        copy_ = tensor.clone()
        self.stored.append(copy_)
        return copy_

    def fetch(self, stored, device):
        self.fetches.append(id(stored))
        return stored.clone()

    def take(self, fetched):
        return fetched


class CountSaved:
    """A plain saved_tensors_hooks counter around each block: what autograd saves there."""

    def __init__(self, model):
        self.count = 0
        for block in model.model.layers:
            block.forward = self._wrap(block.forward)

    def _wrap(self, forward):
        def counted(*args, **kwargs):
            def pack(t):
                self.count += 1
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                return forward(*args, **kwargs)

        return counted


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _pair(mode="none", tiles=0, dtype=torch.float32, preset="tiny"):
    plain = build(preset, vocab_size=320, seed=0).to(dtype)
    wrapped = copy.deepcopy(plain)
    counted = copy.deepcopy(plain)
    for model in (plain, wrapped, counted):
        apply_tiled_mlp(model, tiles)
        apply_activation_checkpointing(model, mode)
    return plain, wrapped, counted


@pytest.mark.parametrize("tiles", [0, 2])
@pytest.mark.parametrize("mode", ["none", "full", "selective"])
@pytest.mark.parametrize("mover", [PassThrough, CopyingMover])
def test_every_saved_tensor_is_handled_and_the_gradients_are_identical(mode, tiles, mover):
    plain, wrapped, counted = _pair(mode, tiles)
    mover = mover()
    offload = apply_activation_offloading(wrapped, torch.device("cpu"), min_bytes=0, mover=mover)
    reference = CountSaved(counted)
    ids = torch.randint(0, 320, (3, 40))
    want_loss, want = _step(plain, ids)
    got_loss, got = _step(wrapped, ids)
    _step(counted, ids)
    assert torch.equal(got_loss, want_loss)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[n], want[n]) for n in want)  # bit for bit: values travel unchanged
    s = offload.stats
    assert s.packed == reference.count > 0  # the pack hook saw each tensor a block saved
    assert s.packed == s.offloaded + s.deduplicated + s.kept
    assert s.offloaded > 0 and s.kept > 0  # with min_bytes=0 only weights and shared inputs stay
    assert s.unpacked == s.offloaded + s.deduplicated  # and backward took each of them back
    if mode == "none":  # q, k and v save the same normed input: it travels once
        assert s.deduplicated >= 2 * wrapped.args.n_layers
    layers = wrapped.args.n_layers
    assert s.fetched_groups == layers and s.prefetched_groups == layers - 1
    if isinstance(mover, CopyingMover):
        assert len(mover.stored) == s.offloaded and len(mover.fetches) == s.offloaded


class TaggingMover(CopyingMover):
    """A CopyingMover that knows which block stored each copy, and logs fetches and takes by block."""

    def __init__(self, model):
        super().__init__()
        self.block, self.owner, self.events = None, {}, []
        for i, block in enumerate(model.model.layers):
            # Runs before the block's (offloading) forward: the stores that follow are block i's.
            block.register_forward_pre_hook(lambda m, a, i=i: setattr(self, "block", i))

    def store(self, tensor):
        copy_ = super().store(tensor)
        self.owner[id(copy_)] = self.block
        return copy_

    def fetch(self, stored, device):
        self.events.append(("fetch", self.owner[id(stored)]))
        back = super().fetch(stored, device)
        self.owner[id(back)] = self.owner[id(stored)]
        return back

    def take(self, fetched):
        self.events.append(("take", self.owner[id(fetched)]))
        return fetched


def test_the_previous_block_is_prefetched_one_block_ahead():
    """When block b's backward takes its first tensor, block b - 1's are fetched: before any of
    them is needed, and not earlier than block b + 1's backward is over (one block ahead only)."""
    _, wrapped, _ = _pair(preset="small")
    mover = TaggingMover(wrapped)
    offload = apply_activation_offloading(wrapped, torch.device("cpu"), min_bytes=0, mover=mover)
    _step(wrapped, torch.randint(0, 320, (2, 32)))
    layers = wrapped.args.n_layers
    assert offload.stats.prefetched_groups == layers - 1
    events = mover.events

    def where(kind, block):
        return [i for i, e in enumerate(events) if e == (kind, block)]

    assert all(where("take", b) and where("fetch", b) for b in range(layers))
    for b in range(1, layers):
        assert max(where("fetch", b - 1)) < min(where("take", b))  # block b - 1 is on its way before block b runs
        if b + 1 < layers:
            assert min(where("fetch", b - 1)) > max(where("take", b + 1))  # but not two blocks ahead


class WeakPassThrough(PassThrough):
    """A pass-through that remembers, weakly, each tensor it was handed."""

    def __init__(self):
        self.refs = []

    def store(self, tensor):
        self.refs.append(weakref.ref(tensor))
        return tensor


def test_saved_tensors_are_freed_by_backward_not_by_the_garbage_collector():
    """Nothing of the hooks' keeps a saved tensor past its backward: with the cyclic garbage
    collector off, every tensor the hooks handled is gone once backward is over (a reference
    cycle between a block's record and its handles once kept them all until a collection)."""
    _, wrapped, _ = _pair()
    mover = WeakPassThrough()
    apply_activation_offloading(wrapped, torch.device("cpu"), min_bytes=0, mover=mover)
    ids = torch.randint(0, 320, (2, 32))
    gc.collect()
    gc.disable()
    try:
        loss = wrapped(ids, labels=ids)
        assert any(ref() is not None for ref in mover.refs)
        loss.backward()
        del loss
        assert mover.refs and all(ref() is None for ref in mover.refs)
    finally:
        gc.enable()


def test_weights_and_the_shared_inputs_stay_on_the_device():
    """Parameters (and the transposed views matmuls save), autocast's cast copies of them and the
    rotary tables every block receives are never stored, whatever their size."""
    _, wrapped, _ = _pair()
    mover = CopyingMover()
    offload = apply_activation_offloading(wrapped, torch.device("cpu"), min_bytes=0, mover=mover)
    ids = torch.randint(0, 320, (2, 48))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = wrapped(ids, labels=ids)
    loss.backward()
    weight_shapes = {tuple(p.shape) for p in wrapped.parameters()} | {
        tuple(p.shape[::-1]) for p in wrapped.parameters()
    }
    tokens = 2 * 48
    assert offload.stats.offloaded > 0
    for t in mover.stored:
        assert tuple(t.shape) not in weight_shapes or tokens in t.shape, tuple(t.shape)
    cos_shape = (48, wrapped.args.hidden_size // wrapped.args.n_heads)
    assert all(tuple(t.shape) != cos_shape for t in mover.stored)


def test_the_default_threshold_keeps_small_tensors():
    """MIN_OFFLOAD_BYTES (1 MiB): the tiny model's saved tensors are all below it."""
    _, wrapped, _ = _pair()
    offload = apply_activation_offloading(wrapped, torch.device("cpu"))
    assert offload.min_bytes == MIN_OFFLOAD_BYTES == 1 << 20
    _step(wrapped, torch.randint(0, 320, (2, 32)))
    assert offload.stats.packed > 0 and offload.stats.offloaded == 0 and offload.stats.kept == offload.stats.packed


def test_a_threshold_between_sizes_splits_them():
    """min_bytes counts bytes: 2 x 64 tokens x 128 hidden x 4 bytes = 64 KiB activations travel
    at 64 KiB, the 512-byte rstd and the 1 KiB log-sum-exp stay."""
    _, wrapped, _ = _pair()
    mover = CopyingMover()
    offload = apply_activation_offloading(wrapped, torch.device("cpu"), min_bytes=64 * 1024, mover=mover)
    _step(wrapped, torch.randint(0, 320, (2, 64)))
    assert offload.stats.offloaded > 0
    assert all(t.numel() * t.element_size() >= 64 * 1024 for t in mover.stored)


def test_evaluation_runs_no_hooks():
    _, wrapped, _ = _pair()
    offload = apply_activation_offloading(wrapped, torch.device("cpu"), min_bytes=0)
    with torch.no_grad():
        wrapped(torch.randint(0, 320, (2, 16)))
    assert offload.stats.packed == 0


def test_a_run_with_offloading_gives_the_losses_without_it(tmp_path):
    """Through the config and the loop: the same losses, and the hooks did run."""
    from tests.helpers import tiny_config
    from trainer import Trainer
    from trainer.metrics import read_metrics

    losses, stats = {}, None
    for on in (False, True):
        config = tiny_config(
            tmp_path / str(on),
            train__max_steps=3,
            train__eval_every=0,
            train__grad_accum_steps=2,
            parallel__activation_offloading=on,
            parallel__activation_checkpointing="full",
        )
        trainer = Trainer(config)
        trainer.train()
        losses[on] = [r["loss"] for r in read_metrics(tmp_path / str(on) / "run" / "metrics.jsonl") if "loss" in r]
        if on:
            stats = trainer.parts.model.activation_offload.stats
    assert losses[True] == losses[False] and len(losses[True]) == 3
    assert stats.packed > 0  # 3 steps x 2 micro-batches x 2 blocks, each saving its inputs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_offloading_frees_device_memory_and_keeps_gradients():
    torch.manual_seed(0)
    plain = build("small", vocab_size=320, seed=0).cuda()
    wrapped = copy.deepcopy(plain)
    offload = apply_activation_offloading(wrapped, torch.device("cuda"))
    ids = torch.randint(0, 320, (8, 1024), device="cuda")
    peaks = []
    results = []
    for model in (plain, wrapped):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        results.append(_step(model, ids))
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())
    (want_loss, want), (got_loss, got) = results
    assert torch.equal(got_loss, want_loss)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=0)
    assert offload.stats.offloaded > 0 and peaks[1] < peaks[0]


def test_a_compiled_block_is_wrapped_outside_its_compiled_code():
    """parallel.compile then offloading: the hooks go around the compiled call (dynamo cannot trace
    their storage bookkeeping) and see what the compiled block saves; the gradients are those of
    the compiled model without offloading. aot_eager: the same wrapping as inductor, without a C++
    compiler's time."""
    torch.manual_seed(0)
    plain = build("tiny", vocab_size=320, seed=0)
    wrapped = copy.deepcopy(plain)
    for model in (plain, wrapped):
        for block in model.model.layers:
            block.compile(fullgraph=True, backend="aot_eager")
    offload = apply_activation_offloading(wrapped, torch.device("cpu"), min_bytes=0, mover=CopyingMover())
    assert all("forward" not in vars(block) for block in wrapped.model.layers)
    ids = torch.randint(0, 320, (2, 32))
    want_loss, want = _step(plain, ids)
    got_loss, got = _step(wrapped, ids)
    assert torch.equal(got_loss, want_loss) and all(torch.equal(got[n], want[n]) for n in want)
    assert (
        offload.stats.offloaded > 0 and offload.stats.unpacked == offload.stats.offloaded + offload.stats.deduplicated
    )
