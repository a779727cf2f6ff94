"""fedtier: hierarchical federated learning with quantization-aware training."""

__version__ = "0.1.0"
