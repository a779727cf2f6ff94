"""Adam over stacked parameters: one optimiser state per device, all devices in one call.

``adam_init(params)`` and ``adam_update(params, grads, state, ...)`` (optax's pair of pure
functions) work on dicts of tensors whose leading dimension indexes the devices ([J, ...]);
Adam is elementwise, so stacking changes nothing. The arithmetic is torch.optim.Adam's
single-tensor path (Kingma & Ba 2015, Algorithm 1 with torch's bias-correction order), so a
device's parameters equal those of its own ``torch.optim.Adam`` to float rounding; the step
counter is per device ([J]) so devices may join late.
"""

from __future__ import annotations

import torch

Params = dict[str, torch.Tensor]
AdamState = dict[str, dict[str, torch.Tensor]]


def adam_init(params: Params) -> AdamState:
    """Zero moments for every entry of ``params`` ([J, ...] each) and step counters [J]."""
    first = next(iter(params.values()))
    return {
        "m": {k: torch.zeros_like(v) for k, v in params.items()},
        "v": {k: torch.zeros_like(v) for k, v in params.items()},
        "step": {"count": torch.zeros(first.shape[0], dtype=torch.float64)},
    }


@torch.no_grad()
def adam_update(
    params: Params,
    grads: Params,
    state: AdamState,
    lr: float,
    betas: tuple[float, float],
    eps: float = 1e-8,
) -> None:
    """One Adam step of every row of every entry, in place (grads shaped like params):
    m ← β1 m + (1 − β1) g; v ← β2 v + (1 − β2) g²;
    p ← p − lr/(1 − β1^t) · m / (√v / √(1 − β2^t) + ε), t the row's step count."""
    beta1, beta2 = betas
    count = state["step"]["count"]
    count += 1
    c1 = 1 - beta1**count  # [J] float64: torch computes these scalars in Python floats
    c2_sqrt = (1 - beta2**count).sqrt()
    step_size = (lr / c1).float()
    for name, p in params.items():
        g = grads[name]
        m, v = state["m"][name], state["v"][name]
        shape = (-1,) + (1,) * (p.dim() - 1)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / c2_sqrt.float().view(shape)).add_(eps)
        p.addcmul_(step_size.view(shape), m / denom, value=-1)
