"""Client tasks: one protocol for classifiers, autoencoders and (later) generative models."""

from fedtier.tasks.base import ClientTask
from fedtier.tasks.classification import AutoencoderTask, ClassificationTask

__all__ = ["AutoencoderTask", "ClassificationTask", "ClientTask"]
