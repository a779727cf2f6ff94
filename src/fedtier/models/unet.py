"""A U-Net denoiser from diffusers (``UNet2DModel``): ε̂ = model(x_t, t).

diffusers is an optional dependency (the ``diffusion`` extra); :func:`require_diffusers`
imports it or says which extra installs it.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from fedtier.errors import ConfigError, FedtierError
from fedtier.models.options import positive_int, positive_ints
from fedtier.models.registry import Shape, register


def require_diffusers() -> ModuleType:
    """The ``diffusers`` module, or a :class:`FedtierError` naming the extra that installs it."""
    try:
        import diffusers
    except ImportError as e:
        raise FedtierError(
            "diffusion models need the optional 'diffusion' extra (diffusers): "
            "pip install 'fedtier[diffusion]'"
        ) from e
    return diffusers


class UNetDenoiser(nn.Module):
    """x_t [B, C, H, W] and integer timesteps t [B] → predicted noise ε̂ [B, C, H, W].

    ``self.unet`` is a diffusers ``UNet2DModel`` (state-dict entries ``unet.*``); the wrapper
    only gives it the ``model(x, t)`` signature of fedtier's denoisers.
    """

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t).sample


@register("unet")
def unet(
    input_shape: Shape,
    num_classes: int,
    *,
    channels: list[int] | tuple[int, ...] = (16, 32, 32),
    layers_per_block: int = 2,
    norm_groups: int = 8,
) -> nn.Module:
    """diffusers' ``UNet2DModel`` without attention: one resolution level per entry of
    ``channels`` (each level but the last halves H and W), ``layers_per_block`` ResNet blocks
    per level, GroupNorm with ``norm_groups`` groups. The default (16/32/32, 2 blocks) has
    0.39 M parameters. ``num_classes`` is ignored (the model is unconditional)."""
    diffusers = require_diffusers()
    chans = positive_ints("channels", list(channels))
    if not chans:
        raise ConfigError("model.channels", channels, "a non-empty list of positive integers")
    groups = positive_int("norm_groups", norm_groups)
    if any(c % groups for c in chans):
        raise ConfigError("model.norm_groups", groups, f"a divisor of every channel count {chans}")
    c, h, w = input_shape
    factor = 2 ** (len(chans) - 1)
    if h % factor or w % factor:
        raise ConfigError(
            "model.channels",
            list(chans),
            f"at most {len(chans)} levels whose halvings divide the {h}×{w} input "
            f"(H and W must be multiples of {factor})",
        )
    levels = len(chans)
    model = diffusers.UNet2DModel(
        sample_size=(h, w),
        in_channels=c,
        out_channels=c,
        block_out_channels=tuple(chans),
        layers_per_block=positive_int("layers_per_block", layers_per_block),
        down_block_types=("DownBlock2D",) * levels,
        up_block_types=("UpBlock2D",) * levels,
        norm_num_groups=groups,
    )
    return UNetDenoiser(model)
