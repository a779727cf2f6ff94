"""Client tasks: one protocol (v2) for classifiers, autoencoders, diffusion models and GANs."""

from fedtier.tasks.base import (
    ONE_MODEL,
    Batch,
    ClientTask,
    Draws,
    Groups,
    LocalConfig,
    LocalUpdate,
    Masked,
    TaskWrapper,
    batch_len,
    batch_to,
    client_batch,
    take,
)
from fedtier.tasks.classification import AutoencoderTask, ClassificationTask
from fedtier.tasks.diffusion import DiffusionTask
from fedtier.tasks.qat import QATTask, qat

__all__ = [
    "ONE_MODEL",
    "AutoencoderTask",
    "Batch",
    "ClassificationTask",
    "ClientTask",
    "DiffusionTask",
    "Draws",
    "Groups",
    "LocalConfig",
    "LocalUpdate",
    "Masked",
    "QATTask",
    "TaskWrapper",
    "batch_len",
    "batch_to",
    "client_batch",
    "qat",
    "take",
]
