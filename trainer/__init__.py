"""A kernel-backed trainer for Llama-family language models.

The public names below load on first use, so `import trainer.ops` (or trainer.models) does not
pull in the loop, the optimizers, FSDP or the data pipeline.
"""

from __future__ import annotations

import importlib

from trainer.third_party import quiet_unactionable_messages

__version__ = "0.1.0"
quiet_unactionable_messages()

_EXPORTS = {
    "Trainer": "trainer.loop",
    "TrainConfig": "trainer.config",
    "load_config": "trainer.config",
    "build_run": "trainer.build",
    "RunParts": "trainer.build",
    "TrainerCallback": "trainer.callbacks",
    "patch_hf": "trainer.hf_patch",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'trainer' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
