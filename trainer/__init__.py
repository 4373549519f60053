"""A kernel-backed trainer for Llama-family language models."""

from trainer.config import TrainConfig, load_config
from trainer.loop import Trainer

__all__ = ["TrainConfig", "Trainer", "load_config"]
__version__ = "0.1.0"
