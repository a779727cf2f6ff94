"""Client-side training."""

from fedtier.local.sgd import LocalConfig, train_client

__all__ = ["LocalConfig", "train_client"]
