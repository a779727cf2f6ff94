"""Differential privacy (SPEC §4.2) here; the privacy attacks that measure what it buys are
in :mod:`fedtier.privacy.inversion` (gradient inversion) and :mod:`fedtier.privacy.membership`
(membership inference).

Differential privacy (SPEC §4.2): central (the edge server clips each update and adds
calibrated Gaussian noise to the sum) and local (each client clips and noises its own update
before upload), with (ε, δ) from Opacus's RDP accountant.

Both are Gaussian mechanisms on one client's update with L2 sensitivity C and noise
multiplier z = σ / C (add/remove-one-client adjacency). What is accounted is what a DP arm
does (:func:`fedtier.security.privacy_record`):

* Sampling: each client of a sampled edge takes part in a cloud round independently with
  probability q (Poisson sampling, :func:`fedtier.topology.plan_round` with ``poisson``), the
  sampling that the subsampled-Gaussian RDP analysis assumes (Mironov, Talwar & Zhang 2019).
  Which edges are sampled does not depend on the data; no amplification is claimed from it,
  so ε is an upper bound when ``edges_per_round`` is below all edges.
* One sample serves the κ edge rounds of a cloud round, so a cloud round is one subsampled
  mechanism whose base is κ adaptively composed Gaussians on the same sample — itself a
  Gaussian with noise multiplier z / √κ (Gaussian RDP α / 2z² adds up κ times).
* Central DP releases every (round, edge, edge round) with fresh noise, also when the edge's
  sample is empty, and divides by the expected count q N_e (the fixed-denominator estimator
  of DP-FedAvg, McMahan et al. 2018, "Learning Differentially Private Recurrent Language
  Models", §2), so neither the count nor the noise depends on who was sampled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from opacus.accountants import RDPAccountant

from fedtier.config import dp_mechanism as dp_mechanism  # re-exported
from fedtier.errors import ConfigError
from fedtier.metrics import MetricSpec, declare_stage_metrics
from fedtier.seeding import torch_generator
from fedtier.upload.chain import STAGES, Stage, UploadContext

if TYPE_CHECKING:  # types only: the aggregation rules import this module's dp_mean
    from fedtier.aggregate.rules import Rule, RuleOutput

declare_stage_metrics({"clipped": MetricSpec("Rows clipped", reduce="sum")})


@dataclass(frozen=True)
class NoiseKey:
    """Which central-DP release a rule makes: the noise stream
    ``torch_generator(seed, "dp-mean", round, edge, edge_round)`` and the fixed denominator
    (the expected number of rows q N_e under Poisson sampling; None divides by the rows)."""

    seed: int = 0
    round: int = 0
    edge: int = 0
    edge_round: int = 0
    expected_rows: float | None = None


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


def dp_mean(clip: float = 1.0, noise: float = 1.0, *, key: NoiseKey | None = None) -> Rule:
    """Central DP (DP-FedAvg, McMahan et al. 2018): clip every row to ‖Δ_i‖₂ ≤ C, sum, add
    N(0, z²C² I) drawn from ``key``'s stream, divide by ``key.expected_rows`` (the fixed
    denominator q N_e) or, when it is None, by the number of rows. Rows are weighted equally
    (the sensitivity of the sum is C). The rule is a pure function of (updates, weights):
    the round loop builds one per (round, edge, edge round), so every release has fresh noise
    and a rerun draws the same. ``updates`` may have no rows when a fixed denominator is set
    (an empty Poisson sample still releases the noise)."""
    _check(clip, noise)
    key = key or NoiseKey()
    if key.expected_rows is not None and not key.expected_rows > 0:
        raise ValueError(f"expected_rows must be positive, got {key.expected_rows!r}")

    def rule(updates: torch.Tensor, weights: torch.Tensor) -> RuleOutput:
        rows = key.expected_rows if key.expected_rows is not None else updates.shape[0]
        if rows == 0:
            raise ValueError("dp-mean without a fixed denominator needs at least one row")
        clipped, norms = _clip_rows(updates, clip)
        g = torch_generator(key.seed, "dp-mean", key.round, key.edge, key.edge_round)
        total = clipped.sum(0) + noise * clip * torch.randn(updates.shape[1], generator=g)
        return total / rows, {"clipped": float((norms > clip).sum())}, None

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
    """ε after ``steps`` Poisson-subsampled Gaussian mechanisms (z = ``noise``,
    q = ``sample_rate``) at ``delta``, from Opacus's RDP accountant (Mironov 2017; Mironov et
    al. 2019)."""
    if steps <= 0:
        return 0.0
    if noise <= 0:
        return float("inf")
    acc = RDPAccountant()
    acc.history = [(noise, sample_rate, steps)]
    return float(acc.get_epsilon(delta))


def round_noise(noise: float, edge_rounds: int) -> float:
    """The noise multiplier of one cloud round: κ Gaussian mechanisms with multiplier z on the
    same sample compose to one Gaussian with multiplier z / √κ."""
    return noise / math.sqrt(edge_rounds)


STAGES["ldp"] = local_dp
