"""Seed 001's three-tier federated GAN (SPEC §7): device discriminators, edge generators, a
cloud generator; the losses and the stacked-discriminator trainer are shared with the other
GAN arms."""

from fedtier.gan.adam import adam_init, adam_update
from fedtier.gan.devices import DeviceDiscriminators
from fedtier.gan.losses import discriminator_loss, fooling_loss, generator_loss
from fedtier.gan.three_tier import (
    GanState,
    ThreeTierResult,
    check_three_tier,
    prepare_three_tier,
    run_three_tier,
    tier_bytes,
)
from fedtier.gan.weights import region_weights

__all__ = [
    "DeviceDiscriminators",
    "GanState",
    "ThreeTierResult",
    "adam_init",
    "adam_update",
    "check_three_tier",
    "discriminator_loss",
    "fooling_loss",
    "generator_loss",
    "prepare_three_tier",
    "region_weights",
    "run_three_tier",
    "tier_bytes",
]
