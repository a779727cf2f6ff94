"""Byzantine-robust aggregation rules (the survey's §4.1 toolkit), as rule factories.

Every factory takes the rule's options (``f``: the number of Byzantine rows it must tolerate,
…) and returns a rule with the signature of :mod:`fedtier.aggregate.rules`,
``(updates [C, P], weights [C]) -> (update [P], metrics)``. Each rule checks its own
precondition on the number of rows n and raises :class:`RulePrecondition` naming it
(Krum: n > 2f + 2; Bulyan: n ≥ 4f + 3; median and trimmed mean: n > 2f).

Rules that select rows return which rows they kept as a [C] bool mask and the number they
rejected as the metric ``rejected``; the round loop turns the mask into counts of rejected
honest and malicious updates (:func:`fedtier.rounds.attribute`). The others return None.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fedtier.aggregate.rules import RULES, Rule, RuleOutput, weighted_mean
from fedtier.errors import ConfigError, FedtierError, UnknownNameError
from fedtier.metrics import MetricSpec, declare_stage_metrics
from fedtier.privacy import NoiseKey, dp_mean

declare_stage_metrics(
    {
        "rejected": MetricSpec("Rows rejected", reduce="sum"),
        "clipped": MetricSpec("Rows clipped", reduce="sum"),
    }
)


class RulePrecondition(FedtierError):
    """A robust rule cannot give its guarantee for this many rows."""


class TooFewRows(ConfigError):
    """A built rule (:func:`build_rule`) was called with fewer rows than it needs: a
    ConfigError on its field, which the round loop tolerates when faults (dropouts, rejected
    uploads, failed edges) removed rows that the configured sample would have had."""


def _need(ok: bool, rule: str, condition: str, n: int, f: int) -> None:
    if not ok:
        raise RulePrecondition(
            f"{rule} needs {condition} updates per aggregation, got n={n} with f={f}; "
            "sample more clients per edge or lower f"
        )


def _selected(mean: torch.Tensor, mask: torch.Tensor) -> RuleOutput:
    """The output of a rule that aggregated the rows of ``mask`` [C] bool."""
    return mean, {"rejected": float((~mask).sum())}, mask


def _check_f(f: int) -> None:
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ValueError(f"f must be a non-negative integer, got {f!r}")


def median(f: int = 1) -> Rule:
    """Coordinate-wise median (Yin et al., 2018); tolerates f < n/2 Byzantine rows. An even n
    gives the mean of the two middle values. Weights are ignored, as in the paper: a weighted
    median would let a Byzantine row buy influence by claiming many samples."""
    _check_f(f)

    def rule(updates: torch.Tensor, weights: torch.Tensor) -> RuleOutput:
        n = updates.shape[0]
        _need(n > 2 * f, "median", "n > 2f", n, f)
        return updates.median(dim=0).values if n % 2 else updates.quantile(0.5, dim=0), {}, None

    return rule


def trimmed_mean(f: int = 1) -> Rule:
    """Coordinate-wise trimmed mean (Yin et al., 2018): drop the f largest and f smallest values
    per coordinate, average the n − 2f others. Weights are ignored (unweighted, as the paper)."""
    _check_f(f)

    def rule(updates: torch.Tensor, weights: torch.Tensor) -> RuleOutput:
        n = updates.shape[0]
        _need(n > 2 * f, "trimmed-mean", "n > 2f", n, f)
        s = updates.sort(dim=0).values
        return s[f : n - f].mean(0), {}, None

    return rule


def _krum_scores(updates: torch.Tensor, neighbours: int) -> torch.Tensor:
    """Krum score [n] (Blanchard et al., 2017): per row, the sum of the squared L2 distances to
    its ``neighbours`` nearest other rows (Krum uses n − f − 2). The squared distances are
    summed exactly in float64 (not via ‖a‖² + ‖b‖² − 2ab or a square root), so equal
    distances tie exactly and ties are broken the same way on every machine."""
    u = updates.double()
    d = torch.stack([(u - row).pow(2).sum(1) for row in u])
    d.fill_diagonal_(float("inf"))
    return d.sort(dim=1).values[:, :neighbours].sum(1)


def krum(f: int = 1, m: int = 1) -> Rule:
    """Krum / Multi-Krum (Blanchard et al., 2017): the m rows with the lowest Krum scores
    (score = sum of squared distances to the n − f − 2 nearest other rows; equal scores: the
    lower row index first), averaged by their weights (the paper's plain mean when the weights
    are equal; with m = 1 the weights do not matter). Needs n > 2f + 2."""
    _check_f(f)
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m must be a positive integer, got {m!r}")
    name = "krum" if m == 1 else "multi-krum"

    def rule(updates: torch.Tensor, weights: torch.Tensor) -> RuleOutput:
        n = updates.shape[0]
        _need(n > 2 * f + 2, name, "n > 2f + 2", n, f)
        _need(m <= n, name, f"m = {m} <= n", n, f)
        chosen = _krum_scores(updates, n - f - 2).argsort(stable=True)[:m]
        mask = torch.zeros(n, dtype=torch.bool)
        mask[chosen] = True
        mean, _, _ = weighted_mean(updates[mask], weights[mask])
        return _selected(mean, mask)

    return rule


def multi_krum(f: int = 1, m: int | None = None) -> Rule:
    """Multi-Krum with m = n − f selected rows unless m is given."""
    if m is not None:
        return krum(f, m)
    _check_f(f)

    def rule(updates: torch.Tensor, weights: torch.Tensor) -> RuleOutput:
        n = updates.shape[0]
        _need(n > 2 * f + 2, "multi-krum", "n > 2f + 2", n, f)
        return krum(f, n - f)(updates, weights)

    return rule


def bulyan(f: int = 1) -> Rule:
    """Bulyan (El Mhamdi et al., 2018): θ = n − 2f rows chosen by iterated Krum, then per
    coordinate the mean of the β = θ − 2f values closest to the median. Needs n ≥ 4f + 3.

    Each Krum step scores the k rows still unselected with k − f − 2 neighbours (at least 1:
    for f = 1 the last step has k = 3, where Krum's count would be 0 and every score tie);
    equal scores pick the lower row index. The median of an even θ is the mean of the two
    middle values; values equally far from it are taken smaller first. Weights are ignored,
    as in the paper."""
    _check_f(f)

    def rule(updates: torch.Tensor, weights: torch.Tensor) -> RuleOutput:
        n = updates.shape[0]
        _need(n >= 4 * f + 3, "bulyan", "n >= 4f + 3", n, f)
        remaining = list(range(n))
        selected: list[int] = []
        while len(selected) < n - 2 * f:
            k = len(remaining)
            scores = _krum_scores(updates[remaining], max(k - f - 2, 1))
            selected.append(remaining.pop(int(scores.argmin())))
        chosen = updates[selected].sort(dim=0).values  # per coordinate, ascending
        beta = len(selected) - 2 * f
        med = chosen.quantile(0.5, dim=0)
        closest = (chosen - med).abs().argsort(dim=0, stable=True)[:beta]
        mean = chosen.gather(0, closest).mean(0)
        mask = torch.zeros(n, dtype=torch.bool)
        mask[selected] = True
        return _selected(mean, mask)

    return rule


def norm_bound(max_norm: float = 1.0) -> Rule:
    """Norm bounding at the server (Sun et al., 2019): clip rows to ‖Δ‖₂ ≤ max_norm, then mean."""
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm!r}")

    def rule(updates: torch.Tensor, weights: torch.Tensor) -> RuleOutput:
        norms = updates.norm(dim=1, keepdim=True)
        clipped = updates * torch.clamp(max_norm / norms.clamp_min(1e-12), max=1.0)
        mean, _, _ = weighted_mean(clipped, weights)
        return mean, {"clipped": float((norms > max_norm).sum())}, None

    return rule


def _cosine(updates: torch.Tensor) -> torch.Tensor:
    u = updates.double()
    u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return u @ u.T


def foolsgold(kappa: float = 1.0, threshold: float = 0.0) -> Rule:
    """FoolsGold (Fung et al., 2020) over the rows of one aggregation: rows that are too
    similar to each other (sybils pushing one direction) get low learning rates.

    cs_ij = cosine (i ≠ j); v_i = max(0, max_j cs_ij); pardoning cs_ij ← cs_ij · v_i / v_j
    when v_j > v_i; α_i = 1 − max(0, max_j cs_ij) clipped to [0, 1], rescaled to max 1, then
    κ·(ln(α/(1−α)) + 0.5) clipped to [0, 1] (α = 1 gives 1). The 0 in both maxima is the
    authors' code's diagonal (cosine − I): a row opposed to every other keeps α = 1 instead of
    having its negative similarities "pardoned" into positive ones. The row's learning rate
    multiplies its weight in the weighted mean (weights alone if every rate is 0). Rows with
    rate ≤ ``threshold`` count as rejected. This is the stateless variant (no history across
    rounds), since rows are anonymous to a rule.
    """

    def rule(updates: torch.Tensor, weights: torch.Tensor) -> RuleOutput:
        n = updates.shape[0]
        _need(n >= 2, "foolsgold", "n >= 2", n, 0)
        cs = _cosine(updates)
        cs.fill_diagonal_(-float("inf"))
        v = cs.max(1).values.clamp_min(0)
        pard = cs.clone()
        for i in range(n):
            for j in range(n):
                if i != j and v[j] > v[i]:
                    pard[i, j] = cs[i, j] * v[i] / v[j]
        alpha = (1 - pard.max(1).values).clamp(0, 1)
        alpha = alpha / alpha.max().clamp_min(1e-12)
        alpha = alpha.clamp(1e-6, 1 - 1e-6)
        lr = (kappa * (torch.log(alpha / (1 - alpha)) + 0.5)).clamp(0, 1)
        lr = torch.where(alpha >= 1 - 1e-6, torch.ones_like(lr), lr).float()
        mask = lr > threshold
        w = weights.to(updates.dtype) * lr
        if float(w.sum()) <= 0:
            w = weights.to(updates.dtype)
        mean, _, _ = weighted_mean(updates, w)
        return _selected(mean, mask)

    return rule


def cosine_filter(xi: float = 2.0, xi_step: float = 0.5) -> Rule:
    """Cosine-similarity filtering in the manner of AFA (Muñoz-González et al., 2019): rows
    whose cosine to the current weighted mean lies below median − ξ·std are removed, the mean
    recomputed, ξ increased by ``xi_step``, until nothing more is removed."""

    def rule(updates: torch.Tensor, weights: torch.Tensor) -> RuleOutput:
        n = updates.shape[0]
        _need(n >= 3, "cosine", "n >= 3", n, 0)
        mask = torch.ones(n, dtype=torch.bool)
        x = xi
        while int(mask.sum()) > 2:
            mean, _, _ = weighted_mean(updates[mask], weights[mask])
            sim = torch.nn.functional.cosine_similarity(updates, mean[None], dim=1)
            s = sim[mask]
            bad = mask & (sim < s.median() - x * s.std())
            if not bool(bad.any()):
                break
            mask &= ~bad
            x += xi_step
        mean, _, _ = weighted_mean(updates[mask], weights[mask])
        return _selected(mean, mask)

    return rule


FACTORIES: dict[str, Callable[..., Rule]] = {
    "median": median,
    "trimmed-mean": trimmed_mean,
    "krum": krum,
    "multi-krum": multi_krum,
    "bulyan": bulyan,
    "norm-bound": norm_bound,
    "foolsgold": foolsgold,
    "cosine": cosine_filter,
    "dp-mean": dp_mean,
}
# rules that draw noise: the round loop gives them a NoiseKey per release (never a user option)
KEYED = frozenset({"dp-mean"})


def rule_names() -> list[str]:
    return sorted(set(RULES) | set(FACTORIES))


def build_rule(
    name: str, options: dict[str, Any] | None, field: str, key: NoiseKey | None = None
) -> Rule:
    """The rule ``name`` with its options; precondition failures become ConfigErrors on
    ``field`` (e.g. ``aggregate.edge_rule``) when the rule is called. A rule that draws noise
    (``KEYED``: dp-mean) draws it from ``key``'s stream, so the caller builds one rule per
    release (round, edge, edge round); other rules ignore ``key``."""
    options = options or {}
    if name in FACTORIES:
        try:
            if name in KEYED and "key" in options:
                raise ValueError("'key' is set by the round loop, not an option")
            extra = {"key": key} if name in KEYED else {}
            inner = FACTORIES[name](**options, **extra)
        except (TypeError, ValueError) as e:
            raise ConfigError(field, options, f"{name}'s options ({e})") from None
    elif name in RULES:
        if options:
            raise ConfigError(field, options, f"no options for '{name}'")
        inner = RULES[name]
    else:
        raise UnknownNameError("aggregation rule", name, rule_names())

    def rule(updates: torch.Tensor, weights: torch.Tensor) -> RuleOutput:
        try:
            return inner(updates, weights)
        except RulePrecondition as e:
            raise TooFewRows(field, name, str(e)) from None

    return rule


def check_rule_config(cfg: Any) -> None:
    """Build both tiers' rules and, where the number of rows is fixed by the topology, check
    their preconditions now (before any training; the options were checked by fedtier.config)."""
    a, t = cfg.aggregate, cfg.topology
    for tier, rows in (("edge", t.clients_per_edge), ("cloud", t.edges_per_round)):
        spec = getattr(a, f"{tier}_rule")
        rule = build_rule(spec.name, spec.options(), f"aggregate.{tier}_rule")
        if rows >= 1 and rows == int(rows):
            rule(
                torch.randn(int(rows), 4, generator=torch.Generator().manual_seed(0)),
                torch.ones(int(rows)),
            )
