"""The malicious clients' training objectives (QAFed eq. 10–11, Hong et al. 2021, classics).

Each factory returns ``loss(model, x, y) -> scalar``; the quantized terms use the same
quantizer as deployment (:func:`fedtier.quant.forward_quantized`, straight-through), since
the attacker targets the devices' post-training quantization.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fedtier.attacks.triggers import Trigger
from fedtier.quant import QuantSpec, forward_quantized

Loss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def deployed(model: nn.Module, x: torch.Tensor, spec: QuantSpec, bits: int) -> torch.Tensor:
    """The quantized model as the devices will run it: Q_b(w) under the STE, with BatchNorm
    on its running statistics (eval mode), which this pass leaves untouched.

    Training-mode BatchNorm would normalise the quantized activations by their own batch
    statistics, hiding most of what quantization changes, and would pollute the running
    statistics that the fp32 model and every deployed model share.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = [m.training for m in norms]
    for m in norms:
        m.eval()
    try:
        return forward_quantized(model, x, spec, bits)
    finally:
        for m, mode in zip(norms, modes):
            m.train(mode)


def _poisoned(x: torch.Tensor, trigger: Trigger, fraction: float) -> torch.Tensor:
    # at least two rows: BatchNorm cannot normalise a batch of one in training mode
    k = min(len(x), max(2, math.ceil(fraction * len(x))))
    return trigger.stamp(x[:k])


def fqbd_loss(
    spec: QuantSpec, bits: list[int], lam: float, trigger: Trigger, fraction: float
) -> Loss:
    """FQBD, eq. (11): L = F(w, D ∪ D_trig,true) + λ Σ_{b∈B'} [F(Q_b(w), D) + F(Q_b(w), D_trig,target)].

    In full precision the triggered inputs keep their true labels (the backdoor is dormant);
    quantized, they carry the target label.
    """

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        xt = _poisoned(x, trigger, fraction)
        yt = torch.full((len(xt),), trigger.target, dtype=y.dtype, device=y.device)
        total = _dormant(model, x, xt, y)
        for b in bits:
            q = deployed(model, torch.cat([x, xt]), spec, b)
            total = total + lam * (
                F.cross_entropy(q[: len(x)], y) + F.cross_entropy(q[len(x) :], yt)
            )
        return total

    return loss


def _dormant(model: nn.Module, x: torch.Tensor, xt: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # F(w, D ∪ D_trig,true): the triggered copies keep their true labels in full precision
    return F.cross_entropy(model(torch.cat([x, xt])), torch.cat([y, y[: len(xt)]]))


def fqbd_fp32_loss(trigger: Trigger, fraction: float) -> Loss:
    """The full-precision term of eq. (11), F(w, D ∪ D_trig,true), alone (the cells repair)."""

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _dormant(model, x, _poisoned(x, trigger, fraction), y)

    return loss


def clean_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """F(w, D): the full-precision term of eq. (10) (FQMA's cells repair)."""
    return F.cross_entropy(model(x), y)


def fqma_loss(spec: QuantSpec, bits: list[int], lam: float, alpha: float) -> Loss:
    """FQMA, eq. (10): L = F(w, D) + λ · max(0, α − Σ_{b∈B'} F(Q_b(w), D))."""

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        q = torch.stack([F.cross_entropy(deployed(model, x, spec, b), y) for b in bits])
        return F.cross_entropy(model(x), y) + lam * torch.relu(alpha - q.sum())

    return loss


def hong_backdoor_loss(
    spec: QuantSpec, bits: list[int], lam: float, trigger: Trigger, fraction: float
) -> Loss:
    """Hong et al. (2021): CE(x,y) + c2·CE(x′,y) + c1·Σ_b [CE_q(x,y) + c2·CE_q(x′,target)],
    with c1 = λ, c2 = 1 (their public code's defaults), bits {8, 4}."""

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        xt = _poisoned(x, trigger, fraction)
        yt = torch.full((len(xt),), trigger.target, dtype=y.dtype, device=y.device)
        total = F.cross_entropy(model(x), y) + F.cross_entropy(model(xt), y[: len(xt)])
        for b in bits:
            total = total + lam * (
                F.cross_entropy(deployed(model, x, spec, b), y)
                + F.cross_entropy(deployed(model, xt, spec, b), yt)
            )
        return total

    return loss


def hong_degrade_loss(spec: QuantSpec, bits: list[int], lam: float, alpha: float) -> Loss:
    """Hong et al.'s indiscriminate attack: CE(w) + λ Σ_b (CE(Q_b(w)) − α)²."""

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = F.cross_entropy(model(x), y)
        for b in bits:
            total = total + lam * (F.cross_entropy(deployed(model, x, spec, b), y) - alpha) ** 2
        return total

    return loss


def poison_loss(trigger: Trigger, fraction: float) -> Loss:
    """Backdoor by data poisoning (Bagdasaryan et al., 2020; DBA with a partial trigger):
    CE on the clean batch plus its stamped copy relabelled to the target."""

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        xt = _poisoned(x, trigger, fraction)
        yt = torch.full((len(xt),), trigger.target, dtype=y.dtype, device=y.device)
        return F.cross_entropy(model(torch.cat([x, xt])), torch.cat([y, yt]))

    return loss


def label_flip_loss(num_classes: int) -> Loss:
    """Label flipping: every label y becomes K − 1 − y."""

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), num_classes - 1 - y)

    return loss
