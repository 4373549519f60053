"""A frozen linear layer in torchao's 4-bit NormalFloat (NF4Tensor): QLoRA's base under FSDP2.

torchao's NF4Tensor implements FSDP2's all-gather hooks, so FSDP2 shards and gathers it in 4 bits;
bitsandbytes' Linear4bit, QLoRA's base in one process and under DDP (trainer/lora.py), has none.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


class _NF4Matmul(torch.autograd.Function):
    """x @ W.T with W an NF4Tensor: W is dequantized for the product in forward and again in
    backward, so autograd keeps the 4-bit weight, never a dense copy (a plain F.linear on the
    dequantized weight would keep every layer's dense weight until backward). W takes no gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return x @ weight.to(x.dtype).t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return grad @ weight.to(grad.dtype), None


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is torchao's NF4Tensor: QLoRA's 4-bit NormalFloat in
    blocks of 64 values, each block's absmax quantized to 8 bits 256 blocks at a time around their
    mean (double quantization). The QLoRA base under FSDP2, which shards and all-gathers it in 4
    bits through torchao's FSDP2 hooks. Built from a plain nn.Linear, on the meta device for a
    sharded build (trainer/parallel/materialize.py then quantizes each whole weight and keeps this
    rank's rows)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        from torchao.quantization import to_nf4  # imported here: only FSDP2's QLoRA needs torchao

        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(to_nf4(linear.weight.detach()), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _NF4Matmul.apply(x, self.weight)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def is_nf4(tensor: torch.Tensor) -> bool:
    """A torchao NF4Tensor, or a DTensor whose shards are. Without torchao imported (no NF4Linear
    was built) nothing is, and nothing imports it here."""
    nf4_tensor = getattr(sys.modules.get("torchao.quantization"), "NF4Tensor", None)
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return nf4_tensor is not None and isinstance(local, nf4_tensor)


def dense(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` with an NF4Tensor dequantized to its original dtype; a DTensor of NF4 shards becomes
    a DTensor of each rank's rows dequantized (their scale mean is the whole tensor's), which
    gathers as plain tensors do. Anything else as it is."""
    if not is_nf4(tensor):
        return tensor
    if not hasattr(tensor, "to_local"):
        return tensor.get_original_weight()
    from torch.distributed.tensor import DTensor

    rows = tensor.to_local().get_original_weight()
    return DTensor.from_local(
        rows, tensor.device_mesh, tensor.placements, run_check=False, shape=tensor.shape, stride=tensor.stride()
    )
