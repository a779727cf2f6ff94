"""A small denoiser for diffusion-shaped tasks: ε̂ = model(x_t, t)."""

from __future__ import annotations

import math
from math import prod

import torch
from torch import nn

from fedtier.errors import ConfigError
from fedtier.models.options import positive_int
from fedtier.models.registry import Shape, register


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps t [B] → [B, dim] (Vaswani et al. 2017, as
    used by DDPM): (sin(t·ω_k), cos(t·ω_k)) with ω_k = 10000^(−k/(dim/2)), k < dim/2."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    angles = t.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class DenoiserMLP(nn.Module):
    """x_t [B, C, H, W] and t [B] → predicted noise ε̂ [B, C, H, W].

    The flattened input and the timestep's sinusoidal embedding are concatenated and mapped
    by Linear–ReLU–Linear–ReLU–Linear back to the input's size.
    """

    def __init__(self, input_shape: Shape, hidden: int, embed: int) -> None:
        super().__init__()
        size = prod(input_shape)
        self.embed = embed
        self.net = nn.Sequential(
            nn.Linear(size + embed, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, size),
            nn.Unflatten(1, input_shape),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x.flatten(1), timestep_embedding(t, self.embed)], dim=1))


@register("denoiser-mlp")
def denoiser_mlp(
    input_shape: Shape, num_classes: int, *, hidden: int = 128, embed: int = 16
) -> nn.Module:
    """A small MLP denoiser with a sinusoidal timestep embedding of ``embed`` (even) values;
    ``num_classes`` is ignored (diffusion-shaped tasks are unlabelled)."""
    embed = positive_int("embed", embed)
    if embed % 2:
        raise ConfigError("model.embed", embed, "an even positive integer")
    return DenoiserMLP(input_shape, positive_int("hidden", hidden), embed)
