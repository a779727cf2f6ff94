"""Gradient inversion on one client's upload (Geiping et al. 2020, "Inverting Gradients —
How easy is it to break privacy in federated learning?", NeurIPS).

The attacker (the edge server) sees an upload Δ [P] and knows the model w it was computed
from. It optimises a dummy input x̂ so that the update the model would make on (x̂, y)
points the same way as Δ:

    min_x̂  1 − ⟨g(x̂), Δ⟩ / (‖g(x̂)‖ ‖Δ‖)  +  λ_TV · TV(x̂),   x̂ ∈ [lo, hi]     (Geiping eq. 4)

with g(x̂) = −∇_w ℓ(f_w(x̂), y) (the direction of one SGD step; the cosine ignores the step
size), TV the anisotropic total variation, and Adam on x̂ with the learning rate divided by
10 at 3/8, 5/8 and 7/8 of the steps (their schedule). The label y is known or, for a single
image, read off the last layer's gradient (Zhao et al. 2020, iDLG): with softmax cross
entropy ∂ℓ/∂W_L = (p − e_y) hᵀ and h ≥ 0 after a ReLU, so the row of the true class is
the only one whose sum is negative (positive in Δ = −η∇).

Success is PSNR and SSIM of x̂ against the true image, both on [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.func import functional_call, grad
from torchmetrics.functional.image import structural_similarity_index_measure

from fedtier.seeding import torch_generator


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio 10 log10(R² / MSE(x, y)) in dB (inf when x == y)."""
    mse = float(((x.double() - y.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> float:
    """Structural similarity (Wang et al. 2004; torchmetrics, 11x11 Gaussian window σ = 1.5)
    of two images [C, H, W] or batches [N, C, H, W]."""
    if x.dim() == 3:
        x, y = x[None], y[None]
    out = structural_similarity_index_measure(
        x.double(), y.double(), data_range=data_range, reduction="elementwise_mean"
    )
    assert isinstance(out, torch.Tensor)
    return float(out)


def match_images(recon: torch.Tensor, truth: torch.Tensor) -> list[tuple[int, int]]:
    """Pairs (reconstruction j, true image k) of the one-to-one assignment that maximises the
    total PSNR (the batch's order is not recoverable; scipy's Hungarian algorithm). Both are
    [N, C, H, W] on [0, 1]."""
    cost = [[-min(psnr(r, t), 1e3) for t in truth] for r in recon]  # exact: inf → 1000 dB
    rows, cols = linear_sum_assignment(cost)
    return [(int(j), int(k)) for j, k in zip(rows, cols)]


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV of x [N, C, H, W]: mean |x_{i+1,j} − x_{i,j}| + mean |x_{i,j+1} − x_{i,j}|."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (
        x[..., :, 1:] - x[..., :, :-1]
    ).abs().mean()


def _loss_fn(
    model: nn.Module,
) -> Callable[[dict[str, torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross entropy of ``model`` run with the given parameters, as a function of them."""

    def loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    return loss


def sgd_update(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str], lr: float
) -> torch.Tensor:
    """The upload of one local SGD step on the batch (x [B, ...], y [B]): Δ = −η ∇_w ℓ, the
    parameters ``names`` concatenated in that order, [P]."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    g = grad(_loss_fn(model))(params, x, y)
    return torch.cat([-lr * g[n].reshape(-1) for n in names])


def infer_label(update: torch.Tensor, last_weight: slice, num_classes: int) -> int:
    """iDLG's label of a single image from its upload Δ = −η∇: the class whose row of the
    last layer's weight update sums highest (the only positive row; see the module doc)."""
    rows = update[last_weight].reshape(num_classes, -1).sum(1)
    return int(rows.argmax())


def invert(
    model: nn.Module,
    observed: torch.Tensor,
    labels: torch.Tensor,
    shape: tuple[int, ...],
    names: list[str],
    *,
    bounds: tuple[float, float],
    steps: int = 300,
    lr: float = 0.1,
    tv: float = 1e-2,
    seed: int = 0,
    key: tuple[int, ...] = (),
) -> torch.Tensor:
    """Reconstruct inputs [B, *shape] (B = len(labels)) whose one-step update matches
    ``observed`` [P] in direction (module doc). The dummy starts from N(0, 1) drawn from
    ``torch_generator(seed, "inversion", *key)``, clamped to ``bounds`` after every step."""
    lo, hi = bounds
    g = torch_generator(seed, "inversion", *key)
    x = torch.randn((len(labels), *shape), generator=g).clamp(lo, hi).requires_grad_(True)
    params = {n: p.detach() for n, p in model.named_parameters()}
    target = observed.detach().float()
    target_norm = target.norm().clamp_min(1e-12)
    grad_fn = grad(_loss_fn(model))
    opt = torch.optim.Adam([x], lr=lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(
        opt, milestones=[steps * 3 // 8, steps * 5 // 8, steps * 7 // 8], gamma=0.1
    )
    for _ in range(steps):
        opt.zero_grad()
        gx = grad_fn(params, x, labels)
        flat = torch.cat([-gx[n].reshape(-1) for n in names])
        cos = (flat * target).sum() / (flat.norm().clamp_min(1e-12) * target_norm)
        obj = 1 - cos + tv * total_variation(x)
        obj.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            x.clamp_(lo, hi)
    return x.detach()
