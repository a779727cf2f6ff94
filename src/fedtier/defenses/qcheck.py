"""Quantization-consistency screening: our answer to QAFed's open problem (SPEC §4.4).

A quantization-activated attack (FQMA, FQBD) makes Q_b(w) behave differently from w on
purpose. An honest update, trained on the ordinary loss, moves Q_b(w) and w together. So the
edge server, holding a small clean set X_s, scores each upload Δ_i by how far the candidate
model w + Δ_i and its deployment-quantized copies disagree on X_s:

    d_i = max_{b ∈ B} mean_{x ∈ X_s} KL( p_{w+Δ_i}(·|x) ‖ p_{Q_b(w+Δ_i)}(·|x) ),

and rejects uploads with d_i > r · median_j d_j (r = ``defense.qcheck_ratio``; at least one
upload, the least divergent, is always kept). The median makes the threshold relative to what
honest clients of the same round show, so no absolute calibration is needed. The default
r = 10 is measured on fqbd-mnist (README, "Attacks and defenses"): honest
uploads scored up to ~10× their edge's median in 98% of cases, FQBD uploads 35–3800×.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from fedtier.quant import QuantSpec, quantize_copy
from fedtier.upload import UploadContext

if TYPE_CHECKING:
    from fedtier.rounds import ArmSetup

Metrics = dict[str, float]


def divergence(
    setup: ArmSetup, w: torch.Tensor, x: torch.Tensor, bits: list[int], spec: QuantSpec
) -> float:
    """max_b mean KL(p_w ‖ p_{Q_b(w)}) on x (the score d_i above, for the model w)."""
    setup.layout.load(setup.model, w)
    model = setup.model.eval()
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


def quant_consistency(x_server: torch.Tensor, bits: list[int], spec: QuantSpec, ratio: float):  # type: ignore[no-untyped-def]
    """The screen for :attr:`fedtier.rounds.ArmSetup.screen`: ``kept/<row>`` flags plus the
    scores' median and maximum."""

    def screen(
        setup: ArmSetup, w: torch.Tensor, deltas: torch.Tensor, ctx: UploadContext
    ) -> Metrics:
        scores = torch.tensor([divergence(setup, w + d, x_server, bits, spec) for d in deltas])
        med = float(scores.median())
        keep = scores <= ratio * med
        keep[int(scores.argmin())] = True
        out = {f"kept/{i}": float(k) for i, k in enumerate(keep.tolist())}
        out.update(
            {"rejected": float((~keep).sum()), "median_kl": med, "max_kl": float(scores.max())}
        )
        return out

    return screen
