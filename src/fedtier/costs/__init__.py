"""Wireless and energy cost model (SS-Diff), resource allocation and the simulated clock."""

from fedtier.costs.model import CostModel, EdgeCosts
from fedtier.costs.wireless import (
    Allocation,
    allocate_min_energy,
    device_costs,
    rate_bps,
    snr_gain,
)

__all__ = [
    "Allocation",
    "CostModel",
    "EdgeCosts",
    "allocate_min_energy",
    "device_costs",
    "rate_bps",
    "snr_gain",
]
