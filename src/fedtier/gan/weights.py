"""The cloud's weights over the regions' community generators (seed 001; SPEC §7).

G = Σ_k w_k G_k with w = softmax over k of sign · L̄_k / T, where L̄_k = E log(1 − D(G_k(z_g)))
is region k's mean fooling loss over its devices (≤ 0; lower = G_k fools its devices more):

* ``neg-loss`` (SPEC §7's choice): sign = −1, so the generator that fools its own devices'
  discriminators best weighs most;
* ``pos-loss`` (the seed's formula, exp(+L)): sign = +1, so the region whose discriminators
  still tell G_k's samples apart weighs most.

Asynchronous global phase: the cloud keeps each region's last score and its age a_k (cloud
updates since that report) and damps stale ones by FedAsync's s(a) = (1 + a)^(−α):
w_k ∝ exp(sign · L̄_k / T) · (1 + a_k)^(−α), over the regions that have reported at least once.
"""

from __future__ import annotations

import numpy as np

from fedtier.schedules import staleness_weight

SCORES = {"neg-loss": -1.0, "pos-loss": 1.0}


def region_weights(
    losses: np.ndarray,
    temperature: float,
    score: str = "neg-loss",
    ages: np.ndarray | None = None,
    alpha: float = 0.0,
    reported: np.ndarray | None = None,
) -> np.ndarray:
    """Weights [K] (float64, summing to 1) from the regions' mean losses L̄ [K].

    ``ages`` [K] and ``alpha`` damp stale scores; ``reported`` [K] bool marks the regions
    that have reported (the others weigh 0). Computed as a max-shifted softmax, so any T > 0
    is safe from overflow."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if score not in SCORES:
        raise ValueError(f"score must be one of {sorted(SCORES)}, got {score!r}")
    logits = SCORES[score] * np.asarray(losses, dtype=np.float64) / temperature
    live = np.ones(len(logits), dtype=bool) if reported is None else np.asarray(reported)
    if not live.any():
        raise ValueError("no region has reported yet")
    shifted = np.where(live, logits - logits[live].max(), -np.inf)
    w = np.exp(shifted)
    if ages is not None:
        w = w * staleness_weight(np.asarray(ages), alpha)
    return np.asarray(w / w.sum())
