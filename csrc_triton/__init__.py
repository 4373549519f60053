"""Raw Triton kernels and their launch helpers, one file per op.

Nothing here knows about autograd, modules or the trainer: a launch helper takes tensors, allocates
its outputs and launches. Importing a submodule imports triton, so `trainer.ops` imports them only
when a kernel is actually wanted (triton exists for Linux only).

No kernel here calls tl.dot: the only matrix products (the fused loss's) stay in torch, so cuBLAS
runs them in the input dtype and fp32 products follow torch.backends.cuda.matmul.allow_tf32.
Every kernel converts its loads to fp32 before any arithmetic, which is also what lets the Triton
interpreter (no bf16 arithmetic) run them on CPU.
"""
