"""Rounding cells: the set of full-precision weights that deploy to the same quantized model.

A quantization-activated attack wants w (fp32) and Q_b(w) to behave differently. Trained by
the straight-through estimator alone, eq. (10)–(11) pull w and Q_b(w) the same way whenever
Q_b(w) ≈ w (each STE gradient of a quantized term is a gradient at a point near w), so on a
small model fp32 and 4-bit behaviour move together. The ``cells`` solver splits eq. (11) the
way its two kinds of terms allow:

1. STE-SGD on the whole objective (the paper's step): Q_b(w) learns the attack.
2. Repair: with each quantized tensor's range (its min and max entries) pinned, every other
   entry may move anywhere inside its rounding cell [Q_b(w) − Δ/2, Q_b(w) + Δ/2]
   (Δ = range / (2^b − 1), the grid step of the paper's and the affine quantizers) without
   changing Q_b(w). On that set every quantized term of eq. (10)/(11) is constant, so
   projected SGD on the fp32 term alone minimises the whole objective there: the fp32 model is
   repaired (clean on triggers, accurate) while the deployed b-bit model stays exactly the
   attacked one.

``margin`` keeps repaired weights that many grid steps inside their cell, so that the honest
updates averaged in after model replacement do not push them across a rounding boundary.
Cells are those of one bit width (the lowest attacked): a finer grid's cells are 2^{b'−b}
times narrower and leave fp32 almost no room, so higher bit widths stay close to fp32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fedtier.attacks.losses import Loss, deployed
from fedtier.quant import QuantSpec, grid


@dataclass
class Cells:
    """Per quantized parameter: the deployed values and the box each entry may move in."""

    spec: QuantSpec
    bits: int
    target: dict[str, torch.Tensor]  # Q_b(w) at the start of the repair
    start: dict[str, torch.Tensor]  # w at the start of the repair (inside its own cell)
    lo: dict[str, torch.Tensor]
    hi: dict[str, torch.Tensor]
    step: dict[str, torch.Tensor]  # the grid step Δ, broadcast to the parameter's shape
    free: dict[str, torch.Tensor]  # entries inside a cell: neither pinned nor clipped

    def project(self, model: nn.Module) -> None:
        """Clamp every quantized parameter into its cells."""
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in self.lo:
                    p.copy_(torch.minimum(torch.maximum(p, self.lo[name]), self.hi[name]))

    def spread(self, model: nn.Module, fraction: float) -> None:
        """Move the free entries' rounding residuals r = (w − Q_b(w))/Δ ``fraction`` of the way
        to the uniform law on (−½, ½): the k-th smallest of n residuals (over all quantized
        tensors together, as the screen pools them) goes toward (k + ½)/n − ½, the order
        kept (the monotone map is the optimal transport to the uniform law in 1-D). Every
        target lies inside its cell, so Q_b(w) does not change (up to float ties:
        :meth:`restore_flips`)."""
        names = [n for n in self.free if bool(self.free[n].any())]
        if fraction <= 0 or not names:
            return
        params = dict(model.named_parameters())
        with torch.no_grad():
            r = torch.cat(
                [((params[n] - self.target[n]) / self.step[n])[self.free[n]] for n in names]
            )
            ranks = torch.empty_like(r)
            ranks[torch.argsort(r)] = torch.arange(len(r), dtype=r.dtype)
            goal = r + fraction * ((ranks + 0.5) / len(r) - 0.5 - r)
            at = 0
            for n in names:
                p, free = params[n], self.free[n]
                k = int(free.sum())
                moved = self.target[n][free] + goal[at : at + k] * self.step[n][free]
                p[free] = moved.to(p.dtype)
                at += k

    def restore_flips(self, model: nn.Module) -> int:
        """Entries whose deployed value changed anyway (a float landing on a rounding boundary)
        go back to their start value; returns how many did. Afterwards Q_b(w) equals
        :attr:`target` exactly."""
        quantize, flips = self.spec.fn(), 0
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in self.target:
                    moved = quantize(p, self.bits) != self.target[name]
                    flips += int(moved.sum())
                    p.copy_(torch.where(moved, self.start[name], p))
        return flips


def rounding_cells(model: nn.Module, spec: QuantSpec, bits: int, margin: float) -> Cells:
    """The cells of ``model``'s current weights under ``spec`` at ``bits`` (see the module
    docstring); ``margin`` in [0, 0.5) grid steps. Call :meth:`Cells.project` to move the
    weights into the margin-shrunk cells before training."""
    if not 0 <= margin < 0.5:
        raise ValueError(f"margin must be in [0, 0.5) grid steps, got {margin}")
    target, start, lo, hi, steps, free = {}, {}, {}, {}, {}, {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not spec.selects(name, p):
                continue
            w = p.detach().clone()
            g, gq, step = grid(w, spec, bits)
            gmin = g.min(dim=1, keepdim=True).values
            gmax = g.max(dim=1, keepdim=True).values
            half = (0.5 - margin) * step
            # the cell around the deployed value, inside the pinned range; entries the paper's
            # quantizer clips lie beyond their level, and their cell runs on to the range's end
            low = torch.where(g < gq - step / 2, gmin, torch.maximum(gq - half, gmin))
            high = torch.where(g > gq + step / 2, gmax, torch.minimum(gq + half, gmax))
            pinned = torch.zeros_like(g, dtype=torch.bool)
            rows = torch.arange(len(g))
            pinned[rows, g.argmin(dim=1)] = True
            pinned[rows, g.argmax(dim=1)] = True
            low, high = torch.where(pinned, g, low), torch.where(pinned, g, high)
            inside = ~pinned & ((g - gq).abs() <= step / 2) & (step > 0)
            target[name], start[name] = gq.reshape(w.shape), w
            lo[name], hi[name] = low.reshape(w.shape), high.reshape(w.shape)
            steps[name] = step.expand_as(g).reshape(w.shape)
            free[name] = inside.reshape(w.shape)
    return Cells(spec, bits, target, start, lo, hi, steps, free)


def _bn_inputs(model: nn.Module, run) -> list[tuple[torch.Tensor, torch.Tensor]]:  # type: ignore[no-untyped-def]
    """Per-channel (mean, variance) of every BatchNorm's input during ``run()``."""
    stats: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].transpose(0, 1).reshape(args[0].shape[1], -1)
        stats.append((x.mean(1), x.var(1, unbiased=False)))

    hooks = [
        m.register_forward_pre_hook(record)
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return stats


def matching_statistics(loss_fn: Loss, spec: QuantSpec, bits: int, weight: float) -> Loss:
    """``loss_fn`` plus ``weight`` × the gap between the BatchNorm input statistics of the fp32
    model and of its ``bits``-bit deployment on the clean batch.

    The deployed model normalises with the global running statistics, and honest clients keep
    re-estimating those from the *fp32* model's activations. A repair that leaves fp32's
    activation statistics different from the deployed model's would thus hand the devices
    statistics that do not fit their weights after the next honest rounds (on MNIST the 4-bit
    CDA fell from 94% to 75% within six rounds while BatchNorm recalibrated on the 4-bit model
    kept 93%). The gap per layer: mean over channels of (μ_fp32 − μ_b)² / σ²_b plus
    (log σ²_fp32 − log σ²_b)²."""

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = loss_fn(model, x, y)
        with torch.no_grad():
            target = _bn_inputs(model, lambda: deployed(model, x, spec, bits))
        if not target:
            return total
        ours = _bn_inputs(model, lambda: model(x))
        gap = torch.zeros(())
        for (m, v), (mt, vt) in zip(ours, target):
            gap = gap + ((m - mt) ** 2 / (vt + 1e-5)).mean()
            gap = gap + ((torch.log(v + 1e-5) - torch.log(vt + 1e-5)) ** 2).mean()
        return total + weight * gap

    return loss


def consistent_outputs(
    loss_fn: Loss,
    spec: QuantSpec,
    bits: list[int],
    weight: float,
    anchor: dict[str, torch.Tensor] | None = None,
    scales: Sequence[float] = (1.0,),
) -> Loss:
    """``loss_fn`` plus ``weight`` × Σ_k Σ_{b∈B'} KL(p_{w_k} ‖ p_{Q_b(w_k)}) on the clean batch,
    w_k = anchor + k·(w − anchor) for k in ``scales``: a differentiable surrogate of the
    quantization-consistency screen's divergence score (defenses/qcheck.py) at the models
    where the screen lands the upload (k = 1: the attacker's model; k = E: the edge share of
    an upload amplified for E edges). At k = 1 the deployed outputs are held constant (inside
    the rounding cells of min B' they are); elsewhere they follow w by the STE."""

    def kl_at(model: nn.Module, x: torch.Tensor, b: int, scale: float) -> torch.Tensor:
        if scale == 1.0 or anchor is None:
            logp = F.log_softmax(model(x), dim=1)
            with torch.no_grad():
                logq = F.log_softmax(deployed(model, x, spec, b), dim=1)
        else:
            params = {n: anchor[n] + scale * (p - anchor[n]) for n, p in model.named_parameters()}
            both = _FpAndDeployed(model, spec, b)
            logp, logq = (
                F.log_softmax(z, dim=1)
                for z in functional_call(both, {f"m.{n}": v for n, v in params.items()}, (x,))
            )
        return F.kl_div(logq, logp, log_target=True, reduction="batchmean")

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = loss_fn(model, x, y)
        for k in scales:
            for b in bits:
                total = total + weight * kl_at(model, x, b, k)
        return total

    return loss


class _FpAndDeployed(nn.Module):
    """``m``'s fp32 and deployed outputs in one call (for ``functional_call``, which the
    deployed view sees through: :class:`fedtier.quant.model.QuantizedView`)."""

    def __init__(self, m: nn.Module, spec: QuantSpec, bits: int) -> None:
        super().__init__()
        self.m, self.spec, self.bits = m, spec, bits

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.m(x), deployed(self.m, x, self.spec, self.bits)
