"""A kernel-backed trainer for Llama-family language models."""

from trainer.config import TrainConfig, load_config
from trainer.hf_patch import patch_hf
from trainer.loop import Trainer

__all__ = ["TrainConfig", "Trainer", "load_config", "patch_hf"]
__version__ = "0.1.0"
