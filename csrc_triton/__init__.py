"""Raw Triton kernels and their launch helpers, one file per op.

Nothing here knows about autograd, modules or the trainer: a launch helper takes tensors, allocates
its outputs and launches. Importing a submodule imports triton, so `trainer.ops` imports them only
when a kernel is actually wanted (triton exists for Linux only).
"""
