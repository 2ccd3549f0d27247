"""Training: the engine's model, sharded with FSDP2 and tensor parallel, resumable with DCP."""

from parallm.train.config import TrainConfig
from parallm.train.trainer import Trainer

__all__ = ["TrainConfig", "Trainer"]
