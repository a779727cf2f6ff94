"""Faults at every tier, injected from ``cfg.faults``, and the edge's validation screen.

What can go wrong in a deployment, each drawn from its own seeded stream (fedtier.seeding),
keyed by where it happens, never by call order:

* a sampled client drops out before uploading (stream ``fault-dropout``: per (round, client)
  with a probability, or per (round, edge) a fixed count of the edge's sampled clients);
* an upload arrives broken (stream ``fault-upload``, per (edge step, client)): with a NaN
  entry, an ±Inf entry, one entry short (a wrong shape), or rescaled to an absurd L2 norm;
* an edge fails for a cloud round (stream ``fault-edge``: per (round, edge) with a
  probability, or per round a fixed count of the sampled edges): it trains no one and sends
  nothing, and the cloud aggregates the others (fedtier.rounds.run_rounds);
* a straggler misses the deadline (the cost model's ``stragglers: drop``).

The validation screen (:func:`screen_uploads`) runs at the edge on every upload before any
screen or rule sees it: it rejects an upload that is not a finite vector of the model's
length with ‖Δ‖₂ ≤ ``faults.max_norm``. Each cause is counted under its own name
(``edge/faults/nan``…); an honest finite update below the bound is never rejected.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedtier.config import FaultsConfig
from fedtier.metrics import MetricSpec, declare_stage_metrics
from fedtier.seeding import numpy_rng

UPLOAD_FAULTS = ("nan", "inf", "wrong_shape", "huge_norm")  # the screen's causes, in order

declare_stage_metrics(
    {
        "nan": MetricSpec("Uploads rejected: NaN", reduce="sum"),
        "inf": MetricSpec("Uploads rejected: Inf", reduce="sum"),
        "wrong_shape": MetricSpec("Uploads rejected: wrong shape", reduce="sum"),
        "huge_norm": MetricSpec("Uploads rejected: norm above faults.max_norm", reduce="sum"),
        "dropped_out": MetricSpec("Clients dropped out after sampling", reduce="sum"),
        "late": MetricSpec("Uploads past the deadline", reduce="sum"),
        "too_few_rows": MetricSpec("Aggregations skipped: too few rows", reduce="sum"),
        "failed_edges": MetricSpec("Edges failed", reduce="sum"),
        "no_update_rounds": MetricSpec("Rounds without an update (model kept)", reduce="sum"),
    }
)


def add_faults(total: dict[str, float], stages: dict[str, float]) -> None:
    """Add an evaluation record's fault counts (``edge/faults/…``, ``cloud/faults/…``) to a
    run's totals (the arm's ``faults`` in summary.json)."""
    for key, v in stages.items():
        if "/faults/" in key:
            total[key] = total.get(key, 0.0) + v


def pick(rate: float, ids: list[int], seed: int, stage: str, t: int, group: int) -> list[bool]:
    """Which of ``ids`` a fault of ``rate`` hits in round ``t``: each independently with
    probability ``rate`` (< 1; the stream ``stage`` at (t, id), so an id's draw does not depend
    on who else is there), or exactly ``int(rate)`` of them (>= 1; at most all; chosen by the
    stream at (t, group))."""
    if rate <= 0 or not ids:
        return [False] * len(ids)
    if rate < 1:
        return [bool(numpy_rng(seed, stage, t, i).random() < rate) for i in ids]
    count = min(int(rate), len(ids))
    hit = numpy_rng(seed, stage, t, group).choice(len(ids), size=count, replace=False)
    chosen = set(int(i) for i in hit)
    return [i in chosen for i in range(len(ids))]


def dropouts(faults: FaultsConfig, seed: int, t: int, edge: int, clients: list[int]) -> list[bool]:
    """[C] True for the sampled ``clients`` of ``edge`` that drop out in cloud round ``t``
    (before their first upload of the round; they are absent from its κ edge rounds)."""
    return pick(faults.dropout, clients, seed, "fault-dropout", t, edge)


def failed_edges(faults: FaultsConfig, seed: int, t: int, edges: list[int]) -> set[int]:
    """The sampled ``edges`` that fail in cloud round ``t``."""
    hit = pick(faults.edge_failure, edges, seed, "fault-edge", t, 0)
    return {e for e, h in zip(edges, hit) if h}


def upload_faults(
    faults: FaultsConfig, seed: int, step: int, clients: list[int]
) -> list[str | None]:
    """The fault (one of :data:`UPLOAD_FAULTS`, or None) of each client's upload at edge step
    ``step``: one uniform draw u per (step, client) from the stream ``fault-upload``, the
    shares laid end to end on [0, 1) in the order of UPLOAD_FAULTS."""
    shares = [getattr(faults, name) for name in UPLOAD_FAULTS]
    if not any(shares):
        return [None] * len(clients)
    out: list[str | None] = []
    for c in clients:
        u, edge = float(numpy_rng(seed, "fault-upload", step, c).random()), 0.0
        fault = None
        for name, share in zip(UPLOAD_FAULTS, shares):
            edge += share
            if u < edge:
                fault = name
                break
        out.append(fault)
    return out


def corrupt(
    deltas: torch.Tensor, faults: list[str | None], absurd_norm: float
) -> list[torch.Tensor]:
    """The rows of ``deltas`` [C, P] as they arrive: unharmed rows are the rows themselves; a
    ``nan``/``inf`` row has its first entry set to NaN/+Inf, a ``wrong_shape`` row is one
    entry short [P − 1], a ``huge_norm`` row is rescaled to ‖Δ‖₂ = ``absurd_norm``."""
    rows = list(deltas.unbind(0))
    for i, fault in enumerate(faults):
        if fault is None:
            continue
        row = rows[i].clone()
        if fault == "nan":
            row[0] = float("nan")
        elif fault == "inf":
            row[0] = float("inf")
        elif fault == "wrong_shape":
            row = row[:-1]
        else:
            norm = float(row.double().norm())
            row = (
                row * (absurd_norm / norm)
                if norm > 0
                else torch.full_like(row, absurd_norm / row.numel() ** 0.5)
            )
        rows[i] = row
    return rows


def screen_uploads(
    uploads: torch.Tensor | Sequence[torch.Tensor], size: int, max_norm: float
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """The edge's validation screen over C uploads (a block [C, P] or C separate vectors):
    (the block [C, size] with every rejected row zero, which rows pass [C] bool, the count of
    rejections by cause). A row is rejected, first cause that applies, for a wrong shape
    (not [size]), a NaN, an ±Inf, or an L2 norm (in float64) above ``max_norm``."""
    if isinstance(uploads, torch.Tensor):
        if uploads.dim() != 2 or uploads.shape[1] != size:
            raise ValueError(f"expected uploads [C, {size}], got {tuple(uploads.shape)}")
        block, shaped = uploads, torch.ones(uploads.shape[0], dtype=torch.bool)
    else:
        shaped = torch.tensor([tuple(u.shape) == (size,) for u in uploads], dtype=torch.bool)
        zeros = torch.zeros(size, dtype=uploads[0].dtype)
        block = torch.stack([u if ok else zeros for u, ok in zip(uploads, shaped.tolist())])
    nan = block.isnan().any(1) & shaped
    inf = block.isinf().any(1) & shaped & ~nan
    finite = shaped & ~nan & ~inf
    # float64 accumulation without a masked or float64 copy of the block (a hot path: every
    # synchronous edge round); the norms of non-finite rows are not used
    norms = torch.linalg.vector_norm(block, dim=1, dtype=torch.float64)
    huge = finite & (norms > max_norm)
    ok = finite & ~huge
    counts = {
        "nan": float(nan.sum()),
        "inf": float(inf.sum()),
        "wrong_shape": float((~shaped).sum()),
        "huge_norm": float(huge.sum()),
    }
    if not bool(ok.all()):
        block = torch.where(ok[:, None], block, 0)
    return block, ok, counts
