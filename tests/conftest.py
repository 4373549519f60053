import os

import torch

# Without a CUDA device the Triton kernels run on CPU through the interpreter; with one they are
# compiled for it (the tests marked gpu need that). Either way it must be decided before triton is
# imported, and an explicit TRITON_INTERPRET in the environment wins.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
