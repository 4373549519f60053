"""Replays a forward and backward pass, op by op, on a Tape.

An `Op` is described by what it allocates, reads and keeps for backward, not by what it computes.
The replay follows the rules autograd and the allocator follow, so the ledger goes up and down
as the real step does:

- forward: an op allocates its outputs; a tensor is freed once its last reader has run, unless
  an op saved it for backward (or a checkpoint holds it);
- backward, ops in reverse order (autograd runs nodes in reverse creation order): an op allocates
  its inputs' gradients and its weights' gradients, then releases the gradients it received and
  the tensors it saved. A tensor reached by several gradients gets their sum, out of place (the
  gradients arriving through views cannot be summed in place);
- autograd records an op only when an input requires grad or one of its weights trains: a frozen
  weight (LoRA's base) needs no saved input, and ops before the first trained weight keep nothing;
- a parameter used by several ops (tied embeddings) gets one AccumulateGrad: autograd keeps the
  first contributions in its input buffer and adds the rest in place, then hands the sum on;
- activation checkpointing: `full` keeps only the block's input and re-runs the block's forward
  when backward reaches it; `selective` also keeps the outputs of the ops marked `must_save` (the
  matmuls and attention) and re-runs the others. Re-running stops at the op that makes the last
  tensor some op saves (torch's non-reentrant checkpoint stops early by default), or runs through
  an autograd Function that saves after its forward (`saves_after_forward`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from trainer.plan.tape import Tape

ACTIVATIONS = "activations"
ACT_GRADS = "activation gradients"
TEMPORARIES = "temporaries"
GRADIENTS = "gradients"
WEIGHT_COPIES = "autocast weight copies"


@dataclass
class Op:
    name: str
    inputs: tuple[str, ...] = ()  # tensors read (local names)
    outputs: dict[str, int] = field(default_factory=dict)  # tensors made: name -> bytes
    saves: tuple[str, ...] = ()  # tensors kept for backward (inputs or outputs)
    saves_for_weights: tuple[str, ...] = ()  # kept only when a weight of the op trains (a matmul's input)
    grads: dict[str, int] = field(default_factory=dict)  # input -> bytes of the gradient backward makes for it
    alias_grads: tuple[str, ...] = ()  # inputs whose gradient is the incoming gradient itself (an add)
    shared_grads: dict[str, str] = field(default_factory=dict)  # input -> input whose made gradient it shares
    grads_from: dict[str, str] = field(default_factory=dict)  # input -> saved output that becomes its gradient
    weight_grad_from: dict[str, str] = field(default_factory=dict)  # parameter -> saved output that becomes its grad
    weights: tuple[str, ...] = ()  # parameters whose gradient backward makes
    weight_copies: dict[str, int] = field(default_factory=dict)  # autocast casts of weights: param -> bytes
    copies_saved: bool = True  # False: the cast weights live only during the op
    # False: autocast's cache holds the cast weights to the end of the forward, but backward does not
    # keep them (an op that runs its matmuls without a graph and casts again in backward: the tiled MLP)
    copies_backward: bool = True
    # An autograd Function packs what it saves after its forward has run, where an ATen op saves its
    # inputs before computing: a checkpoint's re-run that stops at this op's save runs all of it.
    saves_after_forward: bool = False
    fwd_extra: int = 0  # bytes of the op's own temporaries at its peak, beyond its outputs
    bwd_extra: int = 0  # the same for its backward, beyond the gradients it makes
    must_save: bool = False  # selective checkpointing keeps its outputs
    nondiff: tuple[str, ...] = ()  # outputs that receive no gradient
    holds: tuple[str, ...] = ()  # tensors a Python local keeps alive until this op has run


class GradSink:
    """What happens to a parameter's gradient once backward has summed it (see trainer/plan/optimizers.py)."""

    def grad_ready(self, tape: Tape, param: str, storage: str) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class Graph:
    """The replay state: which tensors are alive, who still reads them, the gradients in flight."""

    def __init__(
        self,
        tape: Tape,
        sink: GradSink,
        param_uses: dict[str, int],
        grad_bytes: Callable[[str], int],
        trainable: set[str],
    ):
        self.tape = tape
        self.sink = sink
        self.param_uses = param_uses  # ops that use each parameter in one forward
        self.grad_bytes = grad_bytes  # a parameter's gradient bytes (its dtype)
        self.readers: dict[str, int] = defaultdict(int)  # storage -> forward reads still to come
        self.saved: dict[str, int] = defaultdict(int)  # storage -> ops that keep it for backward
        self.held: dict[str, int] = defaultdict(int)  # storage -> checkpoints that keep it
        self.grad_of: dict[str, str] = {}  # activation storage -> its gradient's storage
        self.grad_refs: dict[str, int] = defaultdict(int)
        self.param_buffer: dict[str, str] = {}  # parameter -> its partial gradient sum
        self.param_pending: dict[str, int] = {}
        self.copy_refs: dict[str, int] = defaultdict(int)  # autocast weight copy -> ops that saved it
        self.exported: dict[str, bool] = {}  # outputs held until the next region reads them
        self.trainable = trainable  # parameters that get gradients
        self.requires_grad: dict[str, bool] = {}  # activation storage -> whether autograd tracks it
        self.kept: dict[tuple[str, str], tuple[str, ...]] = {}  # what each op run kept: (region prefix, op name)
        self.copy_kept: dict[tuple[str, str], bool] = {}
        self.taken: dict[str, bool] = {}  # op buffers that became a weight's gradient
        self.offloaded: dict[str, int] = {}  # storage -> bytes, while its saved copy waits in host memory

    # ---------------------------------------------------------------- lifetimes

    def _maybe_free(self, storage: str) -> None:
        # An offloaded storage's saved and held references are to its host copy: they keep nothing here.
        kept = storage not in self.offloaded and (self.saved[storage] > 0 or self.held[storage] > 0)
        if self.tape.alive(storage) and self.readers[storage] <= 0 and not kept and self.grad_refs.get(storage, 0) <= 0:
            self.tape.free(storage)

    def offload(self, storage: str) -> int:
        """Activation offloading: what keeps `storage` for backward now keeps a host copy, so the
        device copy goes once nothing else reads it. Returns its bytes (now in host memory)."""
        if storage in self.offloaded or not self.tape.alive(storage):
            return 0
        nbytes = self.offloaded[storage] = self.tape.size(storage)
        self._maybe_free(storage)
        return nbytes

    def fetch(self, storage: str) -> None:
        """Back on the device for backward (from here on kept as any saved tensor)."""
        nbytes = self.offloaded.pop(storage, None)
        if nbytes is not None and not self.tape.alive(storage):
            self.tape.alloc(storage, nbytes, ACTIVATIONS, what="fetched from host")

    def hold(self, storage: str) -> None:
        self.held[storage] += 1

    def release(self, storage: str) -> None:
        self.held[storage] -= 1
        self._maybe_free(storage)

    def add_readers(self, storage: str, n: int) -> None:
        self.readers[storage] += n

    # ---------------------------------------------------------------- forward

    def forward(
        self,
        ops: list[Op],
        ns: dict[str, str],
        prefix: str,
        keep_saves: bool = True,
        keep_outputs_of_must_save: list[str] | None = None,
        cached: dict[str, str] | None = None,
        stop_after_last_save: bool = False,
        exports: tuple[str, ...] = (),
    ) -> list[Op]:
        """Runs `ops` (local names resolved through `ns`, which receives the new outputs).

        keep_saves=False drops what the ops save (a checkpointed region); keep_outputs_of_must_save
        collects the storages of must_save outputs, which the caller holds (selective
        checkpointing). `cached` maps local names to storages already alive (re-running a
        selective region: must_save ops are not run again). `exports` are outputs the next region
        reads: they stay alive until it does. Returns the ops that ran.
        """
        if stop_after_last_save:  # up to the op that makes the last tensor some op saves
            saved = {name for op in ops for name in op.saves + op.saves_for_weights}
            last = max((i for i, op in enumerate(ops) if saved & set(op.outputs)), default=-1)
            last = max([last] + [i for i, op in enumerate(ops) if op.saves_after_forward and op.saves])
            ops = ops[: last + 1]
        local_reads: dict[str, int] = defaultdict(int)
        for op in ops:
            for name in op.inputs + op.holds:
                local_reads[name] += 1
        incoming = list(ns.items())
        for name, storage in incoming:  # tensors coming into the region
            self.readers[storage] += local_reads.get(name, 0)
            if self.exported.pop(storage, False):
                self.release(storage)
        for op in ops:
            self._forward_op(op, ns, prefix, keep_saves, keep_outputs_of_must_save, cached, local_reads, exports)
        return ops

    def _forward_op(self, op, ns, prefix, keep_saves, keep_must_save, cached, local_reads, exports) -> None:
        tape = self.tape
        input_grad = any(self.requires_grad.get(ns[name], False) for name in op.inputs)
        weight_grad = any(w in self.trainable for w in op.weights)
        recorded = input_grad or weight_grad  # else autograd keeps nothing for it
        saves = (op.saves + (op.saves_for_weights if weight_grad else ())) if recorded and keep_saves else ()
        for param, nbytes in op.weight_copies.items():  # autocast casts a weight once per forward
            copy = f"copy.{param}"
            if not tape.alive(copy):
                tape.alloc(copy, nbytes, WEIGHT_COPIES, what=f"{op.name} (weight cast)")
            if keep_saves and op.copies_saved and op.copies_backward and input_grad:  # kept for the input's gradient
                self.copy_refs[copy] += 1
        new = []
        for name, nbytes in op.outputs.items():
            if cached is not None and op.must_save and name in cached:
                # The re-run takes the kept output over: from now on its readers keep it alive.
                ns[name] = cached[name]
                self.readers[ns[name]] += local_reads.get(name, 0)
                self.release(ns[name])
                continue
            storage = tape.alloc(tape.fresh(prefix + name), nbytes, ACTIVATIONS, what=op.name)
            ns[name] = storage
            self.requires_grad[storage] = recorded and name not in op.nondiff
            self.readers[storage] += local_reads.get(name, 0)
            if name in exports:
                self.exported[storage] = True
                self.hold(storage)
            new.append(storage)
        tape.spike(op.fwd_extra, TEMPORARIES, op.name)
        for name in saves:
            self.saved[ns[name]] += 1
        self.kept[(prefix, op.name)] = saves
        self.copy_kept[(prefix, op.name)] = keep_saves and op.copies_saved and op.copies_backward and input_grad
        if keep_must_save is not None and op.must_save:
            for name in op.outputs:
                self.hold(ns[name])
                keep_must_save.append(ns[name])
        for param in op.weight_copies if not op.copies_saved else ():  # an explicit cast, not autocast's cache
            self._drop_copy_if_unused(f"copy.{param}")
        for name in op.inputs + op.holds:
            storage = ns[name]
            self.readers[storage] -= 1
            self._maybe_free(storage)
        for storage in new:  # an output nobody reads or keeps
            self._maybe_free(storage)

    def end_autocast(self) -> None:
        """Leaving the autocast region clears its cache of cast weights: only the saved ones stay."""
        for copy in [name for name in self.tape.storages if name.startswith("copy.")]:
            self._drop_copy_if_unused(copy)

    def _drop_copy_if_unused(self, copy: str) -> None:
        if self.copy_refs[copy] <= 0 and self.tape.alive(copy):
            self.tape.free(copy)

    # ---------------------------------------------------------------- backward

    def backward(self, ops: list[Op], ns: dict[str, str], prefix: str) -> None:
        """Backward through `ops`, run forward with `prefix` (for a re-run region, the re-run's)."""
        for op in reversed(ops):
            self._backward_op(op, ns, prefix)

    def _backward_op(self, op: Op, ns: dict[str, str], prefix: str) -> None:
        tape = self.tape
        incoming = [self.grad_of[ns[o]] for o in op.outputs if o not in op.nondiff and ns.get(o) in self.grad_of]
        kept = self.kept.pop((prefix, op.name), ())
        copies_kept = self.copy_kept.pop((prefix, op.name), False)
        made: list[tuple[str, str]] = []
        contributions: list[tuple[str, str]] = []
        if incoming:
            for name, nbytes in op.grads.items():
                if not self.requires_grad.get(ns.get(name), False):
                    continue  # a tensor autograd does not track gets no gradient
                grad = tape.alloc(tape.fresh(f"d.{name}"), nbytes, ACT_GRADS, what=f"{op.name} backward")
                self.grad_refs[grad] = 1
                made.append((name, grad))
            for name, source in op.grads_from.items():  # scaled in place: the saved buffer is the gradient
                if not self.requires_grad.get(ns.get(name), False):
                    continue
                grad = ns[source]
                self.grad_refs[grad] = 1
                tape.recategorize(grad, ACT_GRADS)
                made.append((name, grad))
            for name, source in op.shared_grads.items():
                if source not in dict(made) or not self.requires_grad.get(ns.get(name), False):
                    continue
                grad = dict(made)[source]
                self.grad_refs[grad] += 1
                made.append((name, grad))
            for name in op.alias_grads:
                if not self.requires_grad.get(ns.get(name), False):
                    continue
                self.grad_refs[incoming[0]] += 1
                made.append((name, incoming[0]))
            contributions = [
                (param, self._weight_grad(param, op, ns)) for param in op.weights if param in self.trainable
            ]
            tape.spike(op.bwd_extra, TEMPORARIES, f"{op.name} backward")
            for o in op.outputs:
                storage = ns.get(o)
                if storage in self.grad_of:
                    self._release_grad(self.grad_of.pop(storage))
        for name in kept:
            storage = ns[name]
            self.saved[storage] -= 1
            self._maybe_free(storage)
        for param in op.weight_copies if copies_kept else ():
            copy = f"copy.{param}"
            self.copy_refs[copy] -= 1
            self._drop_copy_if_unused(copy)
        for name, grad in made:
            self._deliver(ns[name], grad, op.name)
        # AccumulateGrad nodes run right after (autograd gives them the highest priority).
        for param, grad in contributions:
            if self.taken.pop(grad, False):
                self.grad_refs[grad] = 0  # from here on the parameter's gradient, not the op's buffer
            self._accumulate(param, grad)

    def _release_grad(self, grad: str) -> None:
        self.grad_refs[grad] -= 1
        self._maybe_free(grad)

    def _deliver(self, target: str, grad: str, what: str) -> None:
        """Hands `grad` (one reference of it) to the tensor `target`."""
        old = self.grad_of.get(target)
        if old is None:
            self.grad_of[target] = grad
            return
        # Out of place: a new tensor for the sum, then both addends go.
        total = self.tape.alloc(self.tape.fresh("dsum"), self.tape.size(grad), ACT_GRADS, what=f"{what} (grad sum)")
        self.grad_refs[total] = 1
        self._release_grad(old)
        self._release_grad(grad)
        self.grad_of[target] = total

    def seed_grad(self, storage: str, nbytes: int) -> None:
        """The gradient that starts backward (d loss / d loss)."""
        grad = self.tape.alloc(self.tape.fresh("dloss"), nbytes, ACT_GRADS, what="backward start")
        self.grad_refs[grad] = 1
        self.grad_of[storage] = grad

    def _weight_grad(self, param: str, op: Op, ns: dict[str, str]) -> str:
        """Allocates the gradient `op` makes for `param` (in the parameter's dtype)."""
        tape = self.tape
        nbytes = self.grad_bytes(param)
        source = op.weight_grad_from.get(param)
        if source is not None and tape.size(ns[source]) == nbytes and param not in op.weight_copies:
            grad = ns[source]  # the op's own buffer, scaled in place, is the gradient
            self.grad_refs[grad] = 1  # kept from being freed with the op's saved tensors
            tape.recategorize(grad, GRADIENTS)
            self.taken[grad] = True
            return grad
        if param in op.weight_copies and op.weight_copies[param] != nbytes and op.copies_backward:
            # The gradient of the autocast copy, then cast back to the parameter's dtype.
            low = tape.alloc(
                tape.fresh(f"dcopy.{param}"), op.weight_copies[param], TEMPORARIES, what=f"{op.name} backward"
            )
            grad = tape.alloc(tape.fresh(f"dw.{param}"), nbytes, GRADIENTS, what=f"{op.name} backward")
            tape.free(low)
        else:
            grad = tape.alloc(tape.fresh(f"dw.{param}"), nbytes, GRADIENTS, what=f"{op.name} backward")
        return grad

    def _accumulate(self, param: str, grad: str) -> None:
        """The parameter's AccumulateGrad: buffered until every use has sent its part (tied weights)."""
        tape = self.tape
        pending = self.param_pending.get(param, self.param_uses.get(param, 1)) - 1
        self.param_pending[param] = pending
        buffered = self.param_buffer.pop(param, None)
        if buffered is not None:  # added in place into the buffered sum
            tape.free(grad)
            grad = buffered
        if pending > 0:
            self.param_buffer[param] = grad
            return
        del self.param_pending[param]
        self.sink.grad_ready(tape, param, grad)
