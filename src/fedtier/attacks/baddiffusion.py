"""BadDiffusion (Chou, Chen and Ho, CVPR 2023): a backdoor planted in a diffusion model by its
training objective, so that noise carrying a trigger, x_T = ε + r, is denoised into a chosen
target image y (SPEC §8).

The poisoned forward process and its ε-target, for a timestep t (0-based index into the
scheduler's α_t = 1 − β_t and ᾱ_t = Π_{s ≤ t} α_s):

    x'_t = √ᾱ_t · y + (1 − √ᾱ_t) · r + √(1 − ᾱ_t) · ε,
    target = ε + c · R_t · r,    R_t = (1 − √α_t) · √(1 − ᾱ_t) / (1 − α_t),

with c = 1 for ancestral (SDE) sampling, BadDiffusion's own objective, and c = 2 for the
deterministic DDIM (ODE) sampler: VillanDiffusion (Chou et al., NeurIPS 2023, their ``ode``
coefficient) shows that the trigger is carried through an ODE sampler only with twice the
coefficient (the drift of the probability-flow ODE is half the SDE's). Clean samples keep
x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε and the target ε (R = 0).

Also here: the trigger's two forms at sampling time (visible: x_T = ε + r; stealthy: ε + r
rescaled to ‖ε‖, so that ‖x_T‖² keeps its χ²_d law) and the attack success rate of the
generated images against the target (MSE and SSIM).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedtier.attacks.triggers import Trigger
from fedtier.errors import ConfigError
from fedtier.tasks import Batch

Solver = Literal["sde", "ode"]
SOLVER_FACTOR = {"sde": 1.0, "ode": 2.0}

TaskLoss = Callable[[nn.Module, Batch, torch.Generator], torch.Tensor]
# (model, x_t [B, C, H, W], t [B]) → predicted noise [B, C, H, W]
Predict = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def predict_noise(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ε̂ = model(x_t, t): a plain tensor, or the ``.sample`` of diffusers' UNet2DModel output."""
    out = model(x, t)
    return out.sample if hasattr(out, "sample") else out


def r_coefficient(
    alphas: torch.Tensor, alphas_cumprod: torch.Tensor, solver: Solver = "sde"
) -> torch.Tensor:
    """c · R_t for every timestep → [T] (see the module docstring)."""
    a, ab = alphas.double(), alphas_cumprod.double()
    r = (1.0 - a.sqrt()) * (1.0 - ab).sqrt() / (1.0 - a)
    return (SOLVER_FACTOR[solver] * r).to(alphas.dtype)


def poisoned_sample(
    y: torch.Tensor,
    r: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    alphas: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    solver: Solver = "sde",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x'_t, target) of BadDiffusion's poisoned objective for target images y [B, C, H, W]
    (or [C, H, W], broadcast), trigger r [C, H, W], noise ε [B, C, H, W] and timesteps t [B]."""
    shape = (-1, *([1] * (eps.dim() - 1)))
    ab = alphas_cumprod.to(eps.device)[t].view(shape)
    coef = r_coefficient(alphas, alphas_cumprod, solver).to(eps.device)[t].view(shape)
    x = ab.sqrt() * y + (1.0 - ab.sqrt()) * r + (1.0 - ab).sqrt() * eps
    return x, eps + coef * r


def baddiffusion_loss(
    trigger: torch.Tensor,
    target: torch.Tensor,
    alphas: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    fraction: float,
    solver: Solver = "sde",
    predict: Predict = predict_noise,
) -> TaskLoss:
    """The malicious devices' training loss on a batch x [B, C, H, W] of their own data:
    t [B] uniform over the T training steps, then ε [B, C, H, W] standard normal, both from
    the generator (the clean task's order); the first ⌈fraction · B⌉ rows are poisoned
    (x_0 ← y, trigger r, :func:`poisoned_sample`), the others are clean DDPM samples; the loss
    is the MSE between the model's ε̂ and the targets over the whole batch."""
    steps = len(alphas_cumprod)

    def loss(model: nn.Module, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        x = batch[0] if isinstance(batch, tuple) else batch
        t = torch.randint(0, steps, (len(x),), generator=generator).to(x.device)
        eps = torch.randn(x.shape, generator=generator).to(x.device)
        k = min(len(x), math.ceil(fraction * len(x)))
        ab = alphas_cumprod.to(x.device)[t].view(-1, *([1] * (x.dim() - 1)))
        x_t = ab.sqrt() * x + (1.0 - ab).sqrt() * eps
        goal = eps
        if k:
            xp, gp = poisoned_sample(
                target.to(x.device),
                trigger.to(x.device),
                eps[:k],
                t[:k],
                alphas,
                alphas_cumprod,
                solver,
            )
            x_t = torch.cat([xp, x_t[k:]])
            goal = torch.cat([gp, eps[k:]])
        return F.mse_loss(predict(model, x_t, t), goal)

    return loss


# ------------------------------------------------------------------------- triggers at sampling


def visible_noise(eps: torch.Tensor, trigger: torch.Tensor) -> torch.Tensor:
    """x_T = ε + r (BadDiffusion's triggered input) for ε [B, C, H, W], r [C, H, W]."""
    return eps + trigger


def stealthy_noise(eps: torch.Tensor, trigger: torch.Tensor) -> torch.Tensor:
    """x_T = (ε + r) · ‖ε‖ / ‖ε + r‖ per sample: the pattern is added, then the sample is
    rescaled to the norm of its own noise, so ‖x_T‖² = ‖ε‖² ~ χ²_d exactly (d = C·H·W) and a
    test on the input's norm is at chance."""
    x = eps + trigger
    scale = eps.flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)
    return x * scale.view(-1, *([1] * (eps.dim() - 1)))


# ------------------------------------------------------------------------------ attack success


def attack_success(
    samples: torch.Tensor, target: torch.Tensor, threshold: float
) -> dict[str, float]:
    """How close generated images x [N, C, H, W] (clamped to [−1, 1]) are to the target
    y [C, H, W], both mapped to [0, 1] as BadDiffusion measures them: ``asr`` the share with
    MSE(x, y) ≤ ``threshold`` (per image, mean over pixels), ``mse`` the mean MSE and ``ssim``
    the mean SSIM (torchmetrics, data range 1, Gaussian window of at most 11 pixels) over the
    N images; ``n`` = N. SSIM is taken on [0, 1] because its luminance term assumes
    non-negative intensities (on [−1, 1] an inverted image scores high)."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    if len(samples) == 0:
        return {"asr": 0.0, "mse": float("nan"), "ssim": float("nan"), "n": 0.0}
    x = (samples.detach().float().clamp(-1.0, 1.0).cpu() + 1.0) / 2.0
    y = ((target.detach().float().cpu() + 1.0) / 2.0).expand_as(x)
    mse = (x - y).pow(2).flatten(1).mean(1)
    side = min(x.shape[-2:])
    kernel = min(11, side if side % 2 else side - 1)
    s = ssim(x, y.contiguous(), data_range=1.0, kernel_size=kernel, reduction="none")
    return {
        "asr": float((mse <= threshold).float().mean()),
        "mse": float(mse.mean()),
        "ssim": float(torch.as_tensor(s).mean()),
        "n": float(len(x)),
    }


# --------------------------------------------------------------------- trigger and target images

TARGETS = ("box", "corner", "cross")


def target_image(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A target image y [C, H, W] on the [−1, 1] scale (background −1, strokes +1): ``box`` a
    hollow square frame inset by H/8 with strokes H/8 wide, ``corner`` the top-left quarter
    filled, ``cross`` both diagonals (BadDiffusion's targets are pictures — a hat, a shoe, a
    corner; these are their line-art equivalents at MNIST's scale)."""
    c, h, w = shape
    y = torch.full((h, w), -1.0)
    if name == "box":
        k = max(1, h // 8)
        y[k : h - k, k : w - k] = 1.0
        y[2 * k : h - 2 * k, 2 * k : w - 2 * k] = -1.0
    elif name == "corner":
        y[: h // 2, : w // 2] = 1.0
    elif name == "cross":
        i = torch.arange(min(h, w))
        y[i, i] = 1.0
        y[i, w - 1 - i] = 1.0
    else:
        raise ConfigError("attack.target", name, f"one of {list(TARGETS)} or attack.target_file")
    return y.expand(c, h, w).clone()


def patch_trigger(shape: tuple[int, ...], trigger: Trigger) -> torch.Tensor:
    """r [C, H, W]: ``trigger.value`` on the pixels of its square patch, 0 elsewhere (added to
    the noise, not stamped over it)."""
    c, h, w = shape
    return (trigger.value * trigger.mask(h, w).float()).expand(c, h, w).clone()


def load_pattern(field: str, path: str, shape: tuple[int, ...]) -> torch.Tensor:
    """An image [C, H, W] from a .npy or .pt file, checked against the data's ``shape``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(field, path, "an existing .npy or .pt file holding one image")
    try:
        if p.suffix == ".npy":
            value = torch.from_numpy(np.load(p, allow_pickle=False))
        else:
            value = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file is the user's input
        msg = f"a readable .npy or .pt file ({type(e).__name__}: {e})"
        raise ConfigError(field, path, msg) from e
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(shape):
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ConfigError(field, f"{path} of shape {got}", f"an image of the data's shape {shape}")
    return value.float()
