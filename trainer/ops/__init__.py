"""Training ops: each dispatches to a Triton kernel on CUDA and to its PyTorch reference elsewhere.

Every op takes `force` (trainer.ops.dispatch.Impl: auto, triton or reference) to choose explicitly.
"""

from trainer.ops.cross_entropy import check_labels, linear_cross_entropy
from trainer.ops.rms_norm import NormCast, add_rms_norm, rms_norm
from trainer.ops.rope import rope
from trainer.ops.swiglu import Activation, gated_activation, swiglu

__all__ = [
    "Activation",
    "NormCast",
    "add_rms_norm",
    "check_labels",
    "gated_activation",
    "linear_cross_entropy",
    "rms_norm",
    "rope",
    "swiglu",
]
