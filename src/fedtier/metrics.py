"""Typed metrics: what a metric means, how it reduces between evaluations, how it is shown.

A stage or a task declares a :class:`MetricSpec` per metric it reports, so the run loop, the
summary and the report handle any metric without knowing its name: a count of uploaded bytes
sums between evaluations, a mean norm averages, an accuracy is the last value measured.

Stage metrics (what upload stages, rules, screens and server steps report each call) are
declared by name with :func:`declare_stage_metrics` in the module that reports them; the run
loop keeps every call's value since the last evaluation (:func:`accumulate`, plain lists in
the run state) and logs :func:`reduce_stages` of them with each evaluation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

Reduce = Literal["sum", "mean", "last", "max"]


@dataclass(frozen=True)
class MetricSpec:
    """One metric's declaration.

    reduce: how values reported between two evaluations combine (``sum``, ``mean``, ``last``
        or ``max``); an evaluation metric (accuracy, MSE) is ``last``.
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
    if how == "max":
        return float(max(values))
    raise ValueError(f"unknown reduction {how!r}: one of sum, mean, last, max")


# --- stage metrics -------------------------------------------------------------------------

STAGE_METRICS: dict[str, MetricSpec] = {}
"""Declared stage metrics by name (the last part of a logged key: ``client/clip/mean_norm``
is ``mean_norm``). One name means one thing wherever it is reported (``clipped`` is always a
count of clipped rows), so a name has one reduction."""

StageValues = dict[str, list[float]]
"""Each stage metric's values since the last evaluation, in call order, by logged key."""


def declare_stage_metrics(specs: Mapping[str, MetricSpec]) -> Mapping[str, MetricSpec]:
    """Declare the metrics a stage reports (name → spec; the spec's ``reduce`` says how the
    calls between two evaluations combine). A name may be declared again by another stage
    with the same reduction; a different one raises ValueError."""
    for name, spec in specs.items():
        known = STAGE_METRICS.get(name)
        if known is not None and known.reduce != spec.reduce:
            raise ValueError(
                f"stage metric {name!r} is declared with reduce={known.reduce!r} "
                f"({known.label!r}); cannot declare it again with reduce={spec.reduce!r}"
            )
        STAGE_METRICS.setdefault(name, spec)
    return specs


def stage_spec(key: str) -> MetricSpec:
    """The declaration of the stage metric logged as ``key`` (``tier/…/name``)."""
    name = key.rpartition("/")[2]
    spec = STAGE_METRICS.get(name)
    if spec is None:
        raise KeyError(
            f"stage metric {key!r} is not declared: declare {name!r} with "
            "fedtier.metrics.declare_stage_metrics in the module that reports it"
        )
    return spec


def accumulate(values: StageValues, prefix: str, metrics: Mapping[str, float]) -> None:
    """Record one call's ``metrics`` under ``prefix/name`` (each name must be declared)."""
    for name, v in metrics.items():
        key = f"{prefix}/{name}"
        stage_spec(key)
        values.setdefault(key, []).append(float(v))


def reduce_stages(values: StageValues) -> dict[str, float]:
    """Each key's calls since the last evaluation, reduced as its declaration says."""
    return {k: reduce_values(stage_spec(k).reduce, vs) for k, vs in values.items()}
