"""Typed metrics: what a metric means, how it reduces between evaluations, how it is shown.

A stage or a task declares a :class:`MetricSpec` per metric it reports, so the run loop, the
summary and the report handle any metric without knowing its name: a count of uploaded bytes
sums between evaluations, a mean norm averages, an accuracy is the last value measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

Reduce = Literal["sum", "mean", "last"]


@dataclass(frozen=True)
class MetricSpec:
    """One metric's declaration.

    reduce: how values reported between two evaluations combine (``sum``, ``mean`` or
        ``last``); an evaluation metric (accuracy, MSE) is ``last``.
    higher_is_better: the direction of improvement (accuracy: True, MSE: False).
    label, unit: how tables name the metric; ``scale`` multiplies the value for display
        (100 for a fraction shown in %), ``fmt`` formats the scaled value.
    """

    label: str
    unit: str = ""
    higher_is_better: bool = True
    reduce: Reduce = "last"
    scale: float = 1.0
    fmt: str = ".4g"

    def title(self) -> str:
        """``label (unit)``, or the label alone without a unit."""
        return f"{self.label} ({self.unit})" if self.unit else self.label

    def show(self, value: float) -> str:
        """The value as tables print it (scaled and formatted)."""
        return format(self.scale * value, self.fmt)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MetricSpec:
        return cls(**d)


def reduce_values(how: Reduce, values: Sequence[float]) -> float:
    """Combine the values one metric took between two evaluations (``how`` of its spec)."""
    if not values:
        raise ValueError("no values to reduce")
    if how == "sum":
        return float(sum(values))
    if how == "mean":
        return float(sum(values)) / len(values)
    if how == "last":
        return float(values[-1])
    raise ValueError(f"unknown reduction {how!r}: one of sum, mean, last")
