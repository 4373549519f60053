"""Messages of other libraries that a user of this trainer cannot act on, kept out of a run's output.

- bitsandbytes (0.49+), on a CPU with AVX512-BF16, tries at import to fetch a 4-bit matmul kernel
  from the Hugging Face hub ("kernels-community") and logs a warning when it cannot (offline, or
  the repository not trusted). It then uses its own CPU kernel, with the same results; the warning
  asks for remote code the user has no reason to trust, in runs that may use no 4-bit layer at all
  (peft and the 8-bit optimizers import bitsandbytes too). docs/finetuning.md says so.
- torch.distributed.checkpoint warns on every load made without collectives ("torch.distributed is
  disabled, unavailable or uninitialized, assuming the intent is to load in a single process"): a
  sharded checkpoint resumed in one process, and rank 0 reading the shards of an async save back
  to write its model.safetensors (trainer/checkpoint.py), both on purpose.
"""

from __future__ import annotations

import logging
import warnings

BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
HUB_KERNEL_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"
DCP_SINGLE_PROCESS_WARNING = "torch.distributed is disabled, unavailable or uninitialized"


class _DropHubKernelWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(HUB_KERNEL_WARNING)


def quiet_unactionable_messages() -> None:
    """Installs the filters; the loggers need not exist yet (bitsandbytes fetches the same one by name)."""
    logger = logging.getLogger(BITSANDBYTES_CPU_LOGGER)
    if not any(isinstance(f, _DropHubKernelWarning) for f in logger.filters):
        logger.addFilter(_DropHubKernelWarning())
    warnings.filterwarnings("ignore", message=DCP_SINGLE_PROCESS_WARNING, category=UserWarning)
