"""The diffusers U-Net denoiser: shapes, option checks, and the missing-extra error."""

import sys

import pytest
import torch

from fedtier.errors import ConfigError, FedtierError
from fedtier.models import build_model, count_parameters


def test_unet_maps_noisy_images_and_timesteps_to_noise_of_the_same_shape():
    m = build_model("unet", (1, 8, 8), 10, channels=[8, 16], layers_per_block=1)
    out = m(torch.randn(3, 1, 8, 8), torch.tensor([0, 10, 999]))
    assert out.shape == (3, 1, 8, 8)
    assert all(k.startswith("unet.") for k in m.state_dict())
    # the preset's model: 16/32/32 channels, two ResNet blocks per level
    assert count_parameters(build_model("unet", (1, 16, 16), 10)) == 387_201


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"channels": [8] * 5}, "model.channels"),  # 8×8 cannot be halved 4 times
        ({"channels": [8, 12]}, "model.norm_groups"),  # 12 channels in 8 groups
        ({"channels": []}, "model.channels"),
        ({"layers_per_block": 0}, "model.layers_per_block"),
    ],
)
def test_bad_unet_options_name_the_field(options, field):
    with pytest.raises(ConfigError, match=field):
        build_model("unet", (1, 8, 8), 10, **options)


def test_without_diffusers_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import fails as if not installed
    with pytest.raises(FedtierError, match=r"fedtier\[diffusion\]"):
        build_model("unet", (1, 8, 8), 10, channels=[8, 16])
