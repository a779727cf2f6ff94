"""Differential privacy (SPEC §4.2): central (the edge server clips each update and adds
calibrated Gaussian noise to the sum) and local (each client clips and noises its own update
before upload), with (ε, δ) from Opacus's RDP accountant.

Both are Gaussian mechanisms on one client's update with L2 sensitivity C and noise
multiplier z = σ / C, applied once per edge round to the clients sampled with probability
q = sampled / N, so one accountant covers both: ε(T) after T rounds at a given δ.
"""

from __future__ import annotations

import numpy as np
import torch
from opacus.accountants import RDPAccountant

from fedtier.aggregate.rules import Rule
from fedtier.errors import ConfigError
from fedtier.seeding import torch_generator
from fedtier.upload.chain import STAGES, Stage, UploadContext


def _clip_rows(deltas: torch.Tensor, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    norms = deltas.norm(dim=1, keepdim=True)
    return deltas * torch.clamp(clip / norms.clamp_min(1e-12), max=1.0), norms


def _check(clip: float, noise: float, where: str | None = None) -> None:
    """Option checks; ValueError (turned into a ConfigError by the rule builder) or, for the
    upload stage, a ConfigError naming ``where``."""
    for name, v, ok, allowed in (
        ("clip", clip, clip > 0, "a positive number"),
        ("noise", noise, noise >= 0, "a number >= 0 (z = σ / C)"),
    ):
        if not ok:
            if where is not None:
                raise ConfigError(f"{where}.{name}", v, allowed)
            raise ValueError(f"{name} must be {allowed}, got {v!r}")


def dp_mean(clip: float = 1.0, noise: float = 1.0, seed: int = 0) -> Rule:
    """Central DP (DP-FedAvg, McMahan et al. 2018): clip every row to ‖Δ_i‖₂ ≤ C, sum, add
    N(0, z²C² I), divide by the number of rows. Rows are weighted equally (the sensitivity of
    the sum is C). The noise stream is seeded by ``seed`` and advances per call, so a run is
    reproducible."""
    _check(clip, noise)
    calls = [0]

    def rule(updates: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        clipped, norms = _clip_rows(updates, clip)
        g = torch.Generator().manual_seed(
            int(np.random.SeedSequence([seed, calls[0], 0xD9]).generate_state(1, np.uint64)[0] >> 1)
        )
        calls[0] += 1
        total = clipped.sum(0) + noise * clip * torch.randn(updates.shape[1], generator=g)
        return total / updates.shape[0], {"clipped": float((norms > clip).sum())}

    return rule


def local_dp(clip: float = 1.0, noise: float = 1.0) -> Stage:
    """Local DP upload stage: each client clips Δ_i to C and adds N(0, z²C² I) itself, with
    randomness from (seed, round, client)."""
    _check(clip, noise, "upload.ldp")

    def stage(deltas: torch.Tensor, ctx: UploadContext) -> tuple[torch.Tensor, dict[str, float]]:
        clipped, norms = _clip_rows(deltas, clip)
        out = torch.empty_like(clipped)
        for i, c in enumerate(ctx.clients):
            g = torch_generator(ctx.seed, "ldp", ctx.round, c)
            out[i] = clipped[i] + noise * clip * torch.randn(deltas.shape[1], generator=g)
        return out, {"clipped": float((norms > clip).sum())}

    return stage


def dp_epsilon(noise: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε after ``steps`` subsampled Gaussian mechanisms (z = ``noise``, q = ``sample_rate``)
    at ``delta``, from Opacus's RDP accountant (Mironov 2017; Mironov et al. 2019)."""
    if steps <= 0:
        return 0.0
    if noise <= 0:
        return float("inf")
    acc = RDPAccountant()
    acc.history = [(noise, sample_rate, steps)]
    return float(acc.get_epsilon(delta))


STAGES["ldp"] = local_dp
