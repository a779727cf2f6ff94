"""Aggregation rules: pure functions ``(updates [C, P], weights [C]) -> (update [P], metrics)``.

The same rule serves an edge (rows = its clients) and the cloud (rows = edges). Robust rules
are added here as further functions with the same signature.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fedtier.errors import UnknownNameError

Rule = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]


def weighted_mean(
    updates: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """Σ_i w_i Δ_i / Σ_i w_i over rows of ``updates`` [C, P]; ``weights`` [C] non-negative."""
    if updates.dim() != 2 or weights.shape != updates.shape[:1]:
        raise ValueError(
            f"expected updates [C, P] and weights [C], got {tuple(updates.shape)} and {tuple(weights.shape)}"
        )
    w = weights.to(updates.dtype)
    total = w.sum()
    if total <= 0:
        raise ValueError("weights must have a positive sum")
    return (w / total) @ updates, {"rows": float(updates.shape[0])}


RULES: dict[str, Rule] = {"mean": weighted_mean}


def get_rule(name: str) -> Rule:
    if name not in RULES:
        raise UnknownNameError("aggregation rule", name, RULES)
    return RULES[name]
