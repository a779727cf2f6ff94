"""Server-side defenses that act on the global model or screen uploads (SPEC §4.3–4.4).

Robust aggregation rules live in :mod:`fedtier.aggregate.robust`, differential privacy in
:mod:`fedtier.privacy`; here are global model clipping (QAFed eq. 22), server-side Gaussian
noise, and the quantization-consistency screen (:mod:`fedtier.defenses.qcheck`).
"""

from __future__ import annotations

import torch

from fedtier.metrics import MetricSpec, declare_stage_metrics
from fedtier.seeding import torch_generator

Metrics = dict[str, float]

declare_stage_metrics(
    {
        # the global model's norm is a level, not a flow: the one before the evaluation
        "clip_norm": MetricSpec("Global model norm before clipping", reduce="last"),
        "clipped": MetricSpec("Rounds clipped", reduce="sum"),
    }
)


def global_clip(rho0: float, rho_step: float, mask: torch.Tensor):  # type: ignore[no-untyped-def]
    """QAFed eq. (22): w_t ← w_t / max(1, ‖w_t‖₂ / ρ_t), ρ_t = ρ_0 + rho_step · t, applied to
    the model's parameters (``mask`` [P]; BatchNorm running statistics are not weights).
    Metrics: ``clip_norm`` ‖w_t‖₂ before clipping (the last round's between evaluations) and
    ``clipped`` (1 when the round clipped; summed: the rounds clipped)."""

    def step(w: torch.Tensor, t: int) -> tuple[torch.Tensor, Metrics]:
        rho = rho0 + rho_step * t
        norm = float(w[mask].norm())
        factor = max(1.0, norm / rho)
        out = torch.where(mask, w / factor, w)
        return out, {"clip_norm": norm, "clipped": float(factor > 1.0)}

    return step


def server_noise(sigma: float, seed: int, mask: torch.Tensor):  # type: ignore[no-untyped-def]
    """Server-side Gaussian noise on the global model's parameters: w_t ← w_t + N(0, σ² I),
    seeded by (seed, round) (the paper's "DP" defense, Table 8)."""

    def step(w: torch.Tensor, t: int) -> tuple[torch.Tensor, Metrics]:
        g = torch_generator(seed, "server-noise", t)
        noise = sigma * torch.randn(w.shape, generator=g)
        return torch.where(mask, w + noise, w), {}

    return step


def compose(*steps):  # type: ignore[no-untyped-def]
    """Apply post-step defenses in order, merging their metrics."""

    def step(w: torch.Tensor, t: int) -> tuple[torch.Tensor, Metrics]:
        metrics: Metrics = {}
        for s in steps:
            w, m = s(w, t)
            metrics.update(m)
        return w, metrics

    return step
