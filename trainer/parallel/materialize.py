"""A sharded model's weights written shard by shard: the model is built on the meta device, split by
tensor parallelism and sharded by FSDP2 (its parameters become DTensors), and only then given
storage, each rank filling its own part. No rank ever holds the whole model.

- From a Hugging Face folder, each rank reads only its part of each tensor with safetensors'
  slicing (`get_slice`), one tensor at a time; an MoE layer's stacked experts read only the experts
  of the rank's rows. A QLoRA base weight (4-bit under FSDP2) is read whole, quantized and cut to
  the rank's rows, one tensor at a time (quantize_local says why).
- From scratch, each parameter's whole initial value is made from a generator seeded with the run's
  seed and the parameter's name (Transformer.initial_weights) and each rank keeps its part: the same
  weights on 1, 2 or N ranks and any mesh, with one parameter at a time in memory (torchtitan builds a seed
  checkpoint on one rank instead; a per-parameter seed needs no extra step or file).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from trainer.errors import CheckpointError
from trainer.models.hf import _join, _skipped, expert_sources, weight_files
from trainer.models.nf4 import NF4Linear, is_nf4


def local_region(param: torch.Tensor) -> tuple[slice, ...]:
    """The part of `param`'s whole value this rank holds, one slice per dimension: all of a plain
    tensor, a DTensor's own shard (FSDP2 and expert parallelism split dimension 0, tensor
    parallelism dimension 0 or 1, and FSDP2 over tensor parallelism both)."""
    if not hasattr(param, "device_mesh"):
        return tuple(slice(0, n) for n in param.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(slice(start, start + n) for start, n in zip(offset, shape))


def write_local(param: torch.Tensor, part: torch.Tensor) -> None:
    """Copies this rank's part (already selected) into `param`'s local storage."""
    local = param.to_local() if hasattr(param, "to_local") else param
    local.copy_(part.to(local.dtype).view(local.shape))


def quantize_local(model: nn.Module, name: str, read_whole: Callable[[], torch.Tensor]) -> None:
    """Parameter `name`, an FSDP2 shard of a torchao NF4Tensor (a QLoRA base, NF4Linear),
    set to this rank's rows of the whole tensor `read_whole()` returns, quantized.

    The whole tensor is quantized, not the rank's rows: double quantization stores the scales'
    offsets from their mean over the whole tensor, which every shard shares (torchao's all-gather
    keeps one rank's). So the 4-bit weights are the same on any number of ranks, and equal to
    quantizing on one device. The rank's rows are copied out (a slice would keep the whole) and
    the parameter replaced: FSDP2 takes the new shard at its lazy init.

    The copy's storage is allocated before the whole tensor is read and quantized, not between
    those temporaries: on CPU, glibc's heap can then give them back, where a kept shard above them
    would pin them."""
    from torch.distributed.tensor import DTensor
    from torchao.quantization import to_nf4

    param = model.get_parameter(name)
    local = param.to_local()
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    assert isinstance(module, NF4Linear), name
    kept = torch.empty_like(local)  # before the read and the quantization's temporaries: see the docstring
    whole = read_whole().to(local.device, local.dtype).contiguous()
    quantized = to_nf4(whole, local.block_size, local.scaler_block_size)
    rows = local_region(param)[0]
    part = quantized.split(rows.stop - rows.start)[rows.start // (rows.stop - rows.start)]
    kept.copy_(part)  # the 4-bit values, block scales and their factors
    # The whole tensor's scale mean and code table: copy_ cannot write them, the meta build left them on meta
    kept.scaler_mean, kept.nf4 = part.scaler_mean, part.nf4
    shard = DTensor.from_local(
        kept, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
    )
    setattr(module, leaf, nn.Parameter(shard, requires_grad=False))


@torch.no_grad()
def materialize(
    model: nn.Module,
    device: torch.device,
    from_hf: str | None,
    seed: int,
    adapters: Iterable[tuple[str, torch.Tensor, torch.Tensor]] = (),
    base_name: Callable[[str], str] = str,
) -> None:
    """Storage for a model sharded on the meta device, then this rank's part of each weight: read
    from the Hugging Face folder `from_hf`, or the seeded initial weights.

    adapters: (name, parameter, whole initial value) of the parameters neither has (LoRA's,
    trainer.lora.adapter_initial_values), read after the storage exists; base_name: a base weight's
    name in the checkpoint (LoRA wraps the layers it adapts). Adapters need `from_hf`."""
    model.to_empty(device=device)
    model.materialize_rotary(device)
    written = set()
    for name, param, values in adapters:
        write_local(param, values[local_region(param)])
        written.add(name)
    if from_hf:
        read_local_parts(model, from_hf, skip=written, base_name=base_name)
        return
    if written:
        raise ValueError("adapters are added to a model read from a checkpoint (from_hf)")
    for _, param, values in model.initial_weights(seed):
        write_local(param, values[local_region(param)])


def read_local_parts(
    model: nn.Module, path: str | Path, skip: set[str] = frozenset(), base_name: Callable[[str], str] = str
) -> None:
    """Each parameter's local part from a folder's safetensors, read by slice: a rank reads its part
    of each tensor and nothing else. Checkpoint tensors the model lacks, or a missing or misshapen
    one, are refused as assign_weights refuses them.

    safetensors maps a file whole, and every page a slice touches stays resident (in RSS) while the
    file is open; the file is opened again for each tensor, so at most one tensor's pages are."""
    named = {
        base_name(name): name for name, _ in model.named_parameters() if name not in skip and not _skipped(name, model)
    }
    own = {stored: model.get_parameter(name) for stored, name in named.items()}
    sources = expert_sources(model.args)
    file_of = {}
    for file in weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            file_of.update({name: str(file) for name in f.keys() if not _skipped(name, model)})
    expected = {n for name in own for n in sources.get(name, [name])}
    unexpected = sorted(set(file_of) - expected)
    missing = sorted(n for n in expected if n not in file_of)
    if unexpected or missing:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model: "
            + (f"unexpected tensor {unexpected[0]}" if unexpected else f"missing {missing[:3]}")
        )

    def read(name: str, region: tuple[slice, ...] | None = None, whole: tuple[int, ...] | None = None):
        """(the region of tensor `name`, all of it without one; its whole shape); None instead of the
        values when the shape is not `whole`."""
        with safe_open(file_of[name], framework="pt") as f:
            sliced = f.get_slice(name)
            shape = tuple(sliced.get_shape())
            if whole is not None and shape != whole:
                return None, shape
            return (sliced[:] if region is None else sliced[region]), shape

    for name, param in own.items():
        region = local_region(param)
        names = sources.get(name, [name])
        if len(names) > 1:  # stacked experts: dimension 0 is the experts, read only this rank's
            gate_up = name.endswith("gate_up_proj")
            stored = len(names) // 2 if gate_up else len(names)
            chosen = range(region[0].start, region[0].stop)  # the experts (dimension 0) this rank holds
            picked = [names[e] for e in chosen] + ([names[stored + e] for e in chosen] if gate_up else [])
            parts = [read(n) for n in picked]
            per_expert = parts[0][1] if parts else read(names[0], (slice(0, 0),))[1]
            shape = (stored, 2 * per_expert[0], per_expert[1]) if gate_up else (stored, *per_expert)
            values = _join(name, [t for t, _ in parts]) if parts else None
        else:  # one checkpoint tensor, maybe under another name (the MoE router); a 4-bit base whole
            # a 4-bit base is read whole below, by quantize_local
            values, shape = read(names[0], (slice(0, 0),) if is_nf4(param) else region, tuple(param.shape))
        if tuple(shape) != tuple(param.shape):
            raise CheckpointError(
                f"checkpoint {path} does not fit this model: {name} is {tuple(shape)} there but "
                f"{tuple(param.shape)} here"
            )
        if values is not None and is_nf4(param):
            quantize_local(model, named[name], lambda stored=names[0]: read(stored)[0])
        elif values is not None:
            write_local(param, values)
