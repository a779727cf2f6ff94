"""Secure aggregation at an edge: the weighted mean of its clients' updates from the secure
sum alone (:func:`fedtier.secure.secagg.secure_sum`).

Weights are applied on the client side, as in Flower's SecAgg+: client i scales its update
by f_i = w_i / max_j w_j (w: the edge rule's weights — sample counts under fedavg, ones under
qafed; the maximum over the edge's scheduled clients is public) and appends f_i · c as one
more coordinate, so a row is [f_i Δ_i, f_i c] ∈ [−c, c]^(P+1) (FedBN's device-kept entries are
not uploaded). The rows are encoded in fixed point mod 2^bits (round(v · scale), two's
complement), securely summed, and the edge decodes S = Σ_{i∈U} f_i Δ_i and F = Σ_{i∈U} f_i
over the clients U whose masked input arrived; the mean is S / F — the edge rule's weighted
mean of the survivors, up to the fixed-point rounding (≤ n / (2 · scale) per coordinate of S).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fedtier.config import SecAggConfig
from fedtier.errors import ConfigError
from fedtier.metrics import MetricSpec, declare_stage_metrics
from fedtier.secure.secagg import (
    PHASES,
    SecAggOutcome,
    complete_graph,
    decode,
    encode,
    harary_graph,
    max_scale,
    secure_sum,
)
from fedtier.seeding import numpy_rng

Metrics = dict[str, float]

declare_stage_metrics(
    {
        "aborted": MetricSpec("Secure-aggregation rounds aborted (< t survivors)", reduce="sum"),
        "dropped": MetricSpec("Clients dropped after sharing keys", reduce="sum"),
        "clipped_coords": MetricSpec("Coordinates clipped to the fixed-point range", reduce="sum"),
        "threshold": MetricSpec("Shamir threshold t", reduce="last"),
        "fixed_point_err": MetricSpec("Max |secure mean − float mean|", reduce="max"),
        "overhead_up_bytes": MetricSpec(
            "Bytes each client sends beyond its fp32 update", unit="B", reduce="mean"
        ),
        **{
            f"{p}_{what}": MetricSpec(f"{p} {label}", unit=unit, reduce="mean")
            for p in PHASES
            for what, label, unit in (
                ("up_bytes", "bytes sent per client", "B"),
                ("down_bytes", "bytes received per client", "B"),
                ("client_s", "compute per client", "s"),
                ("edge_s", "compute at the edge", "s"),
            )
        },
    }
)


@dataclass
class SecureRound:
    """One edge round under secure aggregation."""

    mean: torch.Tensor | None  # [P] the weighted mean of the survivors (None: aborted)
    metrics: Metrics  # under ``secagg/…``
    outcome: SecAggOutcome | None  # the protocol's record (None: fewer than two clients)


def threshold_count(spec: SecAggConfig, shares: int) -> int:
    """t from ``spec.threshold``: a fraction of the shares each client makes (its neighbours
    and itself), rounded up, or a count; at least 2 (one share would be the secret)."""
    t = math.ceil(spec.threshold * shares) if spec.threshold < 1 else int(spec.threshold)
    t = max(t, 2)
    if t > shares:
        raise ConfigError(
            "aggregate.secure.threshold",
            spec.threshold,
            f"a count of at most {shares} (the shares each client makes here) or a fraction",
        )
    return t


def secure_mean(
    deltas: torch.Tensor,
    weights: torch.Tensor,
    arrived: torch.Tensor,
    upload_mask: torch.Tensor,
    spec: SecAggConfig,
    key: tuple[int, int, int, int],
    clients: list[int],
) -> SecureRound:
    """The edge rule's weighted mean of ``deltas`` [C, P] (weights [C]) over the rows that
    ``arrived`` [C] and did not drop out, computed from the secure sum only.

    ``key`` = (seed, round, edge, edge round) keys the simulated dropouts (each client drops
    after sharing its keys with probability ``spec.dropout``) and SecAgg+'s random graph.
    """
    seed, t, edge, k = key
    n = len(clients)
    p_up = int(upload_mask.sum())
    dropout = np.array(
        [numpy_rng(seed, "secagg-dropout", t, edge, k, c).random() < spec.dropout for c in clients]
    )
    gone = ~arrived.numpy() | dropout
    metrics: Metrics = {"dropped": float(gone.sum())}
    if n < 2:  # one client's sum is its update: nothing can be aggregated securely
        return SecureRound(None, {**metrics, "aborted": 1.0}, None)
    if spec.graph == "k-regular":
        order = numpy_rng(seed, "secagg-graph", t, edge, k).permutation(n)
        graph = harary_graph(n, spec.k, [int(u) for u in order])
    else:
        graph = complete_graph(n)
    threshold = threshold_count(spec, min(len(nb) for nb in graph) + 1)
    c = spec.clip_range
    scale = spec.scale if spec.scale is not None else max_scale(c, n, spec.bits)
    if n * c * scale > 2 ** (spec.bits - 1) - 1:
        raise ConfigError(
            "aggregate.secure.scale",
            spec.scale,
            f"at most {max_scale(c, n, spec.bits):.6g} here ({n} clients × clip_range {c} "
            f"× scale must stay below 2^{spec.bits - 1}, or the sum wraps around)",
        )
    w = weights.double()
    f = (w / w.max()).numpy()  # f_i ∈ (0, 1]: the weights on the clients' side
    rows = deltas[:, upload_mask].double().numpy() * f[:, None]
    rows = np.concatenate([rows, (f * c)[:, None]], axis=1)  # [C, P_up + 1]
    words, clipped = encode(rows, c, scale, spec.bits)
    outcome = secure_sum(
        words,
        threshold,
        spec.bits,
        graph,
        drop_before_upload=np.flatnonzero(gone).tolist(),
    )
    metrics.update(cost_metrics(outcome, p_up))
    metrics.update(clipped_coords=float(clipped), threshold=float(threshold))
    if outcome.total is None:
        return SecureRound(None, {**metrics, "aborted": 1.0}, outcome)
    total = decode(outcome.total, scale, spec.bits)
    weight = total[-1] / c
    mean = torch.zeros(deltas.shape[1], dtype=deltas.dtype)
    mean[upload_mask] = torch.from_numpy(total[:-1] / weight).to(deltas.dtype)
    kept = torch.from_numpy(~gone)
    reference = (w[kept] / w[kept].sum()) @ deltas[kept][:, upload_mask].double()
    err = float((mean[upload_mask].double() - reference).abs().max())
    return SecureRound(mean, {**metrics, "aborted": 0.0, "fixed_point_err": err}, outcome)


def cost_metrics(outcome: SecAggOutcome, uploaded: int) -> Metrics:
    """Per phase: bytes up and down and compute per client (means over the clients that took
    part in it), the edge's compute; and the bytes each surviving client sent in all phases
    beyond a plain fp32 upload of its ``uploaded`` floats."""
    out: Metrics = {}
    for phase, cost in outcome.costs.items():
        took_part = cost.up > 0
        for what, values in (("up_bytes", cost.up), ("down_bytes", cost.down)):
            out[f"{phase}_{what}"] = float(values[took_part].mean()) if took_part.any() else 0.0
        out[f"{phase}_client_s"] = float(cost.seconds[took_part].mean()) if took_part.any() else 0.0
        out[f"{phase}_edge_s"] = cost.server_s
    sent = np.sum([cost.up for cost in outcome.costs.values()], axis=0)[outcome.survivors]
    out["overhead_up_bytes"] = float(sent.mean()) - 4.0 * uploaded if len(sent) else 0.0
    return out


COUNTS = ("aborted", "dropped", "clipped_coords")


def add_secure(total: dict[str, float], stages: dict[str, float], name: str = "secagg") -> None:
    """Accumulate one evaluation's ``edge/<name>/…`` stage metrics into a run's record
    (summary.json's ``secure``): counts add up, the largest fixed-point error is kept, the
    threshold is the last, and bytes and seconds (means per client and edge round) are
    averaged over the evaluations."""
    prefix = f"edge/{name}/"
    mine = {k[len(prefix) :]: v for k, v in stages.items() if k.startswith(prefix)}
    if not mine:
        return
    evals = total["evals"] = total.get("evals", 0.0) + 1
    for key, v in mine.items():
        if key in COUNTS:
            total[key] = total.get(key, 0.0) + v
        elif key == "fixed_point_err":
            total[key] = max(total.get(key, 0.0), v)
        elif key == "threshold":
            total[key] = v
        else:
            total[key] = total.get(key, 0.0) + (v - total.get(key, 0.0)) / evals
