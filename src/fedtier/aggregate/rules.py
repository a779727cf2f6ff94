"""Aggregation rules: pure functions ``(updates [C, P], weights [C]) -> (update [P], metrics, kept)``.

The same rule serves an edge (rows = its clients) and the cloud (rows = edges). ``kept`` is
the rows the rule let into its aggregate as a [C] bool mask when the rule selects rows
(Krum, Bulyan, FoolsGold, the cosine filter), None when every row enters (mean, median,
trimmed mean, norm bounding, DP mean); the round loop turns the mask into counts of rejected
honest and malicious updates (:func:`fedtier.rounds.attribute`). Robust rules are added in
:mod:`fedtier.aggregate.robust` as further functions with the same signature.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fedtier.errors import UnknownNameError
from fedtier.metrics import MetricSpec, declare_stage_metrics

Metrics = dict[str, float]
# (update [P], metrics, kept [C] bool or None)
RuleOutput = tuple[torch.Tensor, Metrics, torch.Tensor | None]
Rule = Callable[[torch.Tensor, torch.Tensor], RuleOutput]

declare_stage_metrics({"rows": MetricSpec("Rows aggregated", reduce="sum")})


def weighted_mean(updates: torch.Tensor, weights: torch.Tensor) -> RuleOutput:
    """Σ_i w_i Δ_i / Σ_i w_i over rows of ``updates`` [C, P]; ``weights`` [C] non-negative."""
    if updates.dim() != 2 or weights.shape != updates.shape[:1]:
        raise ValueError(
            f"expected updates [C, P] and weights [C], got {tuple(updates.shape)} and {tuple(weights.shape)}"
        )
    w = weights.to(updates.dtype)
    total = w.sum()
    if total <= 0:
        raise ValueError("weights must have a positive sum")
    return (w / total) @ updates, {"rows": float(updates.shape[0])}, None


RULES: dict[str, Rule] = {"mean": weighted_mean}


def get_rule(name: str) -> Rule:
    if name not in RULES:
        raise UnknownNameError("aggregation rule", name, RULES)
    return RULES[name]
