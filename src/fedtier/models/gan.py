"""DCGAN-sized generator and discriminator for small images (Radford et al., 2016).

``dcgan-generator``: z [B, z_dim] → Linear(z_dim → 2w·(H/4)·(W/4)) – BatchNorm1d – ReLU –
reshape [B, 2w, H/4, W/4] – ConvTranspose(2w → w, 4, stride 2, pad 1) – BatchNorm2d – ReLU –
ConvTranspose(w → C, 4, stride 2, pad 1) – tanh → images [B, C, H, W] in [-1, 1]. With the
defaults (z_dim = 64, w = 64) and MNIST's 1×28×28 that is z=64 → 128·7·7 → 64·14·14 → 1·28·28.

``dcgan-discriminator``: images [B, C, H, W] → Conv(C → w, 4, stride 2, pad 1) – LeakyReLU(0.2)
– Conv(w → 2w, 4, stride 2, pad 1) – LeakyReLU(0.2) – Flatten – Linear(→ 1) → one logit [B, 1]
(D(x) = sigmoid(logit)). It has no BatchNorm on purpose: a discriminator's forward pass is then
a pure function of its parameters and its own batch, so many devices' discriminators can be
stacked and trained together with ``torch.func.functional_call`` + ``vmap`` (fedtier.gan), and a
device's output does not depend on which other samples share its batch.

Both factories ignore ``num_classes`` (the GANs here are unconditional); ``input_shape`` is the
shape of one image, the generator's output and the discriminator's input.
"""

from __future__ import annotations

import torch
from torch import nn

from fedtier.errors import ConfigError
from fedtier.models.options import positive_int
from fedtier.models.registry import Shape, register


class Generator(nn.Module):
    """z [B, z_dim] → images [B, C, H, W] in [-1, 1] (the DCGAN generator described above)."""

    def __init__(self, input_shape: Shape, z_dim: int, width: int, batchnorm: bool) -> None:
        super().__init__()
        channels, height, width_px = input_shape
        self.z_dim = z_dim
        self.image_shape: Shape = input_shape
        start = (2 * width, height // 4, width_px // 4)
        self.project = nn.Sequential(
            nn.Linear(z_dim, start[0] * start[1] * start[2]),
            nn.BatchNorm1d(start[0] * start[1] * start[2]) if batchnorm else nn.Identity(),
            nn.ReLU(),
            nn.Unflatten(1, start),
        )
        self.upsample = nn.Sequential(
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1),
            nn.BatchNorm2d(width) if batchnorm else nn.Identity(),
            nn.ReLU(),
            nn.ConvTranspose2d(width, channels, 4, stride=2, padding=1),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.upsample(self.project(z))


@register("dcgan-generator")
def dcgan_generator(
    input_shape: Shape,
    num_classes: int,
    *,
    z_dim: int = 64,
    width: int = 64,
    batchnorm: bool = True,
) -> nn.Module:
    """The DCGAN generator for images of ``input_shape`` (height and width divisible by 4);
    ``z_dim`` is the latent size, ``width`` the channels before the last layer (2·width after
    the projection); ``batchnorm`` False drops both BatchNorms. ``num_classes`` is ignored."""
    z_dim, width = positive_int("z_dim", z_dim), positive_int("width", width)
    if not isinstance(batchnorm, bool):
        raise ConfigError("model.batchnorm", batchnorm, "true or false")
    _, height, width_px = input_shape
    if height % 4 or width_px % 4:
        raise ConfigError(
            "input_shape",
            input_shape,
            "height and width divisible by 4 for model 'dcgan-generator' (e.g. 1×28×28)",
        )
    return Generator(input_shape, z_dim, width, batchnorm)


@register("dcgan-discriminator")
def dcgan_discriminator(input_shape: Shape, num_classes: int, *, width: int = 64) -> nn.Module:
    """The DCGAN discriminator without BatchNorm: images [B, *input_shape] → logits [B, 1];
    ``width`` is the first conv's channels (the second has 2·width). ``num_classes`` is ignored."""
    width = positive_int("width", width)
    channels, height, width_px = input_shape
    if height < 4 or width_px < 4:
        raise ConfigError(
            "input_shape",
            input_shape,
            "height and width of at least 4 for model 'dcgan-discriminator'",
        )
    h, w = _halve(_halve(height)), _halve(_halve(width_px))
    return nn.Sequential(
        nn.Conv2d(channels, width, 4, stride=2, padding=1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),
        nn.LeakyReLU(0.2),
        nn.Flatten(),
        nn.Linear(2 * width * h * w, 1),
    )


def _halve(size: int) -> int:
    """Output size of a 4×4 conv with stride 2 and padding 1: ⌊(size + 2 − 4) / 2⌋ + 1."""
    return (size - 2) // 2 + 1
