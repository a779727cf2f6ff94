"""The upload path as a value: a named chain of stages over all clients of an edge at once.

A stage is a callable ``(deltas [C, P], ctx) -> (deltas [C, P], metrics)``; a chain applies
its stages in order and reports each stage's metrics under the stage's own name
(``clip/clipped``). An empty chain is the identity. A stage that carries state from one
upload to the next (error feedback) keeps it in ``ctx.state``, its entry of the run's state
(``ctx.states``, owned by :class:`fedtier.rounds.RunState`), never in a closure. Attacks, clipping, local DP noise,
compression codecs and radio cost models are all stages (see ``STAGES``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from fedtier.errors import ConfigError
from fedtier.metrics import MetricSpec, declare_stage_metrics


@dataclass(frozen=True)
class UploadContext:
    """Who is uploading: the round, the edge and its sampled clients (row order of deltas)."""

    round: int
    edge: int
    clients: list[int]
    num_samples: torch.Tensor  # [C]
    seed: int
    radio: Any = None  # the cost model (fedtier.costs.CostModel), for resource-aware codecs
    payload_bytes: dict[int, int] = field(default_factory=dict)  # client → bytes a codec sent
    # the run's state of the chain's stateful stages (error feedback), owned by the RunState
    # (fedtier.rounds); None = a fresh state for this call only
    states: dict[str, dict[str, Any]] | None = None
    state: dict[str, Any] | None = None  # this stage's entry of ``states`` (set by the Chain)


class Stage(Protocol):
    def __call__(
        self, deltas: torch.Tensor, ctx: UploadContext
    ) -> tuple[torch.Tensor, dict[str, float]]: ...


@dataclass(frozen=True)
class Chain:
    stages: tuple[tuple[str, Stage], ...] = ()

    def __call__(
        self, deltas: torch.Tensor, ctx: UploadContext
    ) -> tuple[torch.Tensor, dict[str, float]]:
        metrics: dict[str, float] = {}
        states = ctx.states if ctx.states is not None else {}
        for i, (name, stage) in enumerate(self.stages):
            stage_ctx = replace(ctx, state=states.setdefault(f"{i}.{name}", {}))
            deltas, m = stage(deltas, stage_ctx)
            metrics.update({f"{name}/{k}": v for k, v in m.items()})
        return deltas, metrics


def named_chain(*stages: tuple[str, Stage]) -> Chain:
    return Chain(tuple(stages))


declare_stage_metrics(
    {
        "clipped": MetricSpec("Rows clipped", reduce="sum"),
        "mean_norm": MetricSpec("Mean update norm before clipping", reduce="mean"),
    }
)


def clip_norm(max_norm: float) -> Stage:
    """Norm bounding: each client's update is scaled to ‖Δ_i‖₂ ≤ max_norm (survey; DP's clip).
    Metrics: ``clipped`` (rows clipped, summed between evaluations) and ``mean_norm`` (the
    mean of the rows' norms before clipping, averaged over the calls between evaluations)."""
    if not max_norm > 0:
        raise ConfigError("upload.clip.max_norm", max_norm, "a positive number")

    def stage(deltas: torch.Tensor, ctx: UploadContext) -> tuple[torch.Tensor, dict[str, float]]:
        norms = deltas.norm(dim=1, keepdim=True)
        scale = torch.clamp(max_norm / norms.clamp_min(1e-12), max=1.0)
        return deltas * scale, {
            "clipped": float((norms > max_norm).sum()),
            "mean_norm": float(norms.mean()),
        }

    return stage


STAGES: dict[str, Callable[..., Stage]] = {"clip": clip_norm}


def build_chain(specs: Sequence[Any]) -> Chain:
    """From config: the validated stages of ``cfg.upload`` (fedtier.config.StageConfig, e.g.
    ``{name: clip, max_norm: 5.0}``) → a Chain, each stage built by its factory in ``STAGES``."""
    return Chain(tuple((spec.name, STAGES[spec.name](**spec.options())) for spec in specs))
