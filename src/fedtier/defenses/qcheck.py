"""Quantization-consistency screening: our answer to QAFed's open problem (SPEC §4.4).

A quantization-activated attack (FQMA, FQBD) makes Q_b(w) behave differently from w on
purpose. An honest update, trained on the ordinary loss, moves Q_b(w) and w together. So the
edge server, holding a small clean set X_s, scores each upload Δ_i by how far the model it
would contribute, w + s_i·Δ_i (s_i its share of the edge's mean: n_i/Σn under FedAvg, 1/n
under QAFed), and that model's deployment-quantized copies disagree on X_s:

    d_i = max_{b ∈ B} mean_{x ∈ X_s} KL( p_{w+s_iΔ_i}(·|x) ‖ p_{Q_b(w+s_iΔ_i)}(·|x) ),

and rejects uploads with d_i > r · median_j d_j (r = the qcheck defense's ``ratio``; at least one
upload, the least divergent, is always kept). The median makes the threshold relative to what
honest clients of the same round show, so no absolute calibration is needed.

Each upload is scored at its edge share and, in rounds of E > 1 edges, at 1/E of it (where
it lands in the global model: :func:`landing_scales`). Scoring at the share rather than at
w + Δ_i matters against model replacement: an
update amplified by γ ≈ 1/s_i puts the attacker's model at w + s_iΔ_i, where its fp32 and
quantized behaviour differ by design, whereas w + Δ_i extrapolates far beyond it, to a model
that is wrecked alike in fp32 and quantized (FQMA uploads scored 0 there on fqbd-mnist's
setting). The default r = 10 is measured (README, "Attacks and defenses").

A second test looks at the weights, not the outputs. Rounding to the grid of b bits leaves
each weight a residual r = (w − Q_b(w))/Δ in [−½, ½]; weights trained without regard to the
grid have |r| spread evenly over [0, ½] (on fqbd-mnist's global model the Kolmogorov–Smirnov
distance from uniform is 0.003, and 0.0025–0.004 for honest candidates). An attack that plants
its behaviour in the rounding (fedtier's ``cells`` solver repairs fp32 inside the cells of Q_b,
with a margin; EFRAP notes that such backdoors hinge on round-to-nearest) piles residuals up
(its model: 0.5). The screen scores each contributed model by that distance, the largest over
B, and rejects uploads scoring above r × the edge's median as well. An attacker who knows this
test could spread its residuals again, at the cost of room to repair; the divergence test
remains.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedtier.aggregate.server import client_weights
from fedtier.local.arm import map_jobs
from fedtier.local.jobs import JobContext
from fedtier.metrics import MetricSpec, declare_stage_metrics
from fedtier.quant import QuantSpec, grid, quantize_copy
from fedtier.upload import UploadContext

if TYPE_CHECKING:
    from fedtier.local.arm import ArmSetup

Metrics = dict[str, float]

declare_stage_metrics(
    {
        "rejected": MetricSpec("Uploads rejected", reduce="sum"),
        "median_kl": MetricSpec("Median divergence score", reduce="mean"),
        "max_kl": MetricSpec("Largest divergence score", reduce="max"),
    }
)


def divergence(
    setup: ArmSetup, w: torch.Tensor, x: torch.Tensor, bits: list[int], spec: QuantSpec
) -> float:
    """max_b mean KL(p_w ‖ p_{Q_b(w)}) on x (the score d_i above, for the model w)."""
    setup.layout.load(setup.model, w)
    return model_divergence(setup.model, x, bits, spec)


def model_divergence(model: nn.Module, x: torch.Tensor, bits: list[int], spec: QuantSpec) -> float:
    """:func:`divergence` of the state already loaded in ``model``."""
    model = model.eval()
    device = next(model.parameters()).device
    x = x.to(device)
    with torch.no_grad():
        logp = F.log_softmax(model(x), dim=1)
        worst = 0.0
        for b in bits:
            logq = F.log_softmax(quantize_copy(model, spec, b).eval()(x), dim=1)
            kl = F.kl_div(logq, logp, log_target=True, reduction="batchmean")
            worst = max(worst, float(kl))
    return worst


def grid_distance(setup: ArmSetup, w: torch.Tensor, bits: list[int], spec: QuantSpec) -> float:
    """max_b over B of the Kolmogorov–Smirnov distance between the rounding residuals 2|r| of
    the quantized weights (entries the quantizer does not clip) and the uniform law on [0, 1]."""
    setup.layout.load(setup.model, w)
    return model_grid_distance(setup.model, bits, spec)


def model_grid_distance(model: nn.Module, bits: list[int], spec: QuantSpec) -> float:
    """:func:`grid_distance` of the state already loaded in ``model``."""
    worst = 0.0
    with torch.no_grad():
        for b in bits:
            residuals = []
            for name, p in model.named_parameters():
                if spec.selects(name, p):
                    g, gq, step = grid(p, spec, b)
                    r = ((g - gq) / step.clamp_min(1e-12)).abs().flatten()
                    residuals.append(r[r <= 0.5 + 1e-4])
            doubled = torch.cat(residuals or [torch.zeros(0)]) * 2
            # numpy's sort: the same values as torch.sort's, ~3x faster on CPU (|r| ≥ +0,
            # so no signed zeros whose order could differ)
            u = torch.from_numpy(np.sort(doubled.cpu().numpy())).clamp(0, 1)
            n = len(u)
            if n == 0:
                continue
            above = torch.arange(1, n + 1, dtype=u.dtype) / n - u
            below = u - torch.arange(0, n, dtype=u.dtype) / n
            worst = max(worst, float(torch.maximum(above, below).max()))
    return worst


ScoreJob = tuple[torch.Tensor, torch.Tensor, list[float], torch.Tensor, list[int], QuantSpec]


def upload_scores(context: JobContext, job: ScoreJob) -> list[list[float]]:
    """The screen's two scores of one upload at each of its landing points: ``job`` = (w [P],
    Δ [P], factors [S], x_server, B, spec) → [[divergence, grid distance] per factor s], for
    the models w + s·Δ loaded in turn into the context's model (a container: the executor's
    workers run this with their own copies, :func:`fedtier.local.arm.map_jobs`)."""
    w, delta, factors, x, bits, spec = job
    model = context.model
    out = []
    for s in factors:
        context.layout.load(model, w + s * delta)
        out.append([model_divergence(model, x, bits, spec), model_grid_distance(model, bits, spec)])
    return out


def landing_scales(setup: ArmSetup, ctx: UploadContext) -> list[float]:
    """Where an upload's model can land, as multiples of its edge share: 1 (the edge's mean)
    and, in a synchronous round of E > 1 edges, 1/E (the cloud's mean of E similar edges). A
    replacement attacker alone in its edge scales its upload by E so that the *global* model
    becomes its model; scored at the edge share only, that model would be E times too far."""
    from fedtier.local.arm import round_plan

    plan = round_plan(setup, ctx.round)
    edges = 1 if plan is None else len(plan.edges)
    return [1.0] if edges <= 1 else [1.0, 1.0 / edges]


def quant_consistency(x_server: torch.Tensor, bits: list[int], spec: QuantSpec, ratio: float):  # type: ignore[no-untyped-def]
    """The screen for :attr:`fedtier.local.arm.ArmSetup.screen`: ``(setup, w, deltas [C, P],
    ctx) -> (kept [C] bool, metrics)``, the uploads it lets through and as metrics the number
    rejected and the divergence scores' median (averaged between evaluations) and maximum
    (the largest between evaluations)."""

    def screen(
        setup: ArmSetup, w: torch.Tensor, deltas: torch.Tensor, ctx: UploadContext
    ) -> tuple[torch.Tensor, Metrics]:
        weights = client_weights(setup.cfg.aggregate.rule, ctx.num_samples)
        shares = weights / weights.sum()
        keep = torch.ones(len(deltas), dtype=torch.bool)
        scales = landing_scales(setup, ctx)
        factors = [[float(scale * shares[i]) for scale in scales] for i in range(len(deltas))]
        # one job per upload, all its landing points: side by side in the executor's workers
        jobs = [(w, d, f, x_server, bits, spec) for d, f in zip(deltas, factors)]
        scored = torch.tensor(map_jobs(setup, upload_scores, jobs))  # [C, scales, 2]
        for j, scale in enumerate(scales):
            kl, grid_d = scored[:, j, 0], scored[:, j, 1]
            keep &= (kl <= ratio * kl.median()) & (grid_d <= ratio * grid_d.median())
            if scale == 1.0:
                scores = kl
        med = float(scores.median())
        keep[int(scores.argmin())] = True
        return keep, {
            "rejected": float((~keep).sum()),
            "median_kl": med,
            "max_kl": float(scores.max()),
        }

    return screen
