"""Fully connected models: the MNIST MLP classifier and a small autoencoder."""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

import torch
from torch import nn

from fedtier.errors import ConfigError
from fedtier.models.options import positive_int, positive_ints
from fedtier.models.registry import Shape, register


@register("mlp")
def mlp(
    input_shape: Shape,
    num_classes: int,
    *,
    hidden: int | None = None,
    layers: Sequence[int] | None = None,
) -> nn.Module:
    """Flatten–[Linear–ReLU]*–Linear; one hidden layer of ``hidden`` units (default 100).

    784–100–10 for MNIST (79,510 parameters). ``layers`` gives several hidden sizes instead
    (``[]`` is multinomial logistic regression); set at most one of ``hidden`` and ``layers``.
    """
    if hidden is not None and layers is not None:
        raise ConfigError(
            "model.layers", layers, "either 'hidden' or 'layers' for model 'mlp', not both"
        )
    if layers is not None:
        sizes = positive_ints("layers", layers)
    else:
        sizes = [positive_int("hidden", 100 if hidden is None else hidden)]
    return nn.Sequential(nn.Flatten(), *_dense_stack([prod(input_shape), *sizes, num_classes]))


class Autoencoder(nn.Module):
    """MLP autoencoder: x [B, C, H, W] → latent [B, latent] → reconstruction [B, C, H, W].

    The output layer is linear (no sigmoid), so it fits normalised as well as [0, 1] inputs.
    """

    def __init__(self, input_shape: Shape, hidden: int, latent: int) -> None:
        super().__init__()
        size = prod(input_shape)
        self.encoder = nn.Sequential(nn.Flatten(), *_dense_stack([size, hidden, latent]))
        self.decoder = nn.Sequential(
            *_dense_stack([latent, hidden, size]), nn.Unflatten(1, input_shape)
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent codes [B, latent] of a batch [B, C, H, W]."""
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


@register("autoencoder")
def autoencoder(
    input_shape: Shape, num_classes: int, *, hidden: int = 128, latent: int = 32
) -> nn.Module:
    """A tiny MLP autoencoder (input → ``hidden`` → ``latent`` → ``hidden`` → input).

    ``num_classes`` is ignored: this model proves that non-classification tasks plug in.
    """
    return Autoencoder(input_shape, positive_int("hidden", hidden), positive_int("latent", latent))


def _dense_stack(sizes: Sequence[int]) -> list[nn.Module]:
    """Linear layers between consecutive ``sizes`` with a ReLU between (not after) them."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(n_in, n_out))
    return layers
