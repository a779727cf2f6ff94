"""GAN losses on discriminator logits (D(x) = sigmoid(logit)), shared by every GAN arm.

All are means over the batch, written with softplus so they are stable for any logit:
log D(x) = −softplus(−l) and log(1 − D(x)) = −softplus(l).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

GENERATOR_LOSSES = ("non-saturating", "minimax")


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """−L(D) of seed 001: −(E log D(x) + E log(1 − D(G(z_d)))) = E softplus(−l_real) +
    E softplus(l_fake), minimised by the discriminator; logits [B] or [B, 1] → scalar."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def fooling_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """L_D(G) = E log(1 − D(G(z_g))) = −E softplus(l) (seed 001's L_{D_kj}(G_k)): ≤ 0, lower
    when G fools D more. It is the region's score (SPEC §7) whatever the generator's loss."""
    return -F.softplus(fake_logits).mean()


def generator_loss(fake_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """What the generator minimises on D's logits of its samples: ``minimax`` = E log(1 − D)
    (:func:`fooling_loss`, saturates while D rejects the samples), ``non-saturating`` =
    −E log D = E softplus(−l) (Goodfellow et al. 2014, §3)."""
    if kind == "minimax":
        return fooling_loss(fake_logits)
    if kind == "non-saturating":
        return F.softplus(-fake_logits).mean()
    raise ValueError(f"generator loss must be one of {GENERATOR_LOSSES}, got {kind!r}")
