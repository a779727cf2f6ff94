"""A diffusion-shaped task: DDPM's ε-prediction objective on unlabelled data (Ho et al. 2020).

The forward process is taken in closed form (eq. 4): with a linear variance schedule
β_1 … β_T (``beta_start`` to ``beta_end``, T = ``steps``), α_t = 1 − β_t and
ᾱ_t = Π_{s ≤ t} α_s,

    x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε,    ε ~ N(0, I),

and the denoiser ε̂ = model(x_t, t) is trained with L_simple (eq. 14), the mean squared error
‖ε − ε̂‖² averaged over the batch's elements. Timesteps are indices 0 … T−1 (DDPM's
t = 1 … T). Every draw of the loss comes from the task's generator, in this order: t [B]
uniform over the T steps, then ε [B, ...] standard normal. Evaluation is the same MSE on the
test set with t and ε drawn once from a fixed evaluation stream, so it is deterministic and
the same at every evaluation and bit width. Labels are ignored.

Sampling is DDIM (Song et al. 2021, η = 0: deterministic given x_T) with diffusers'
``DDIMScheduler`` over the same linear schedule, in S steps (``sample_steps``);
:func:`sample` runs any contiguous range of those steps, so collaborative sampling (the edge
runs the first t steps, the device the remaining S − t; SS-Diff, SPEC §8) is two calls.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedtier.data import ArrayDataset
from fedtier.errors import FedtierError
from fedtier.metrics import MetricSpec
from fedtier.seeding import torch_generator
from fedtier.tasks.base import ONE_MODEL, Batch, Draws, Groups, LocalUpdate, Masked, device_of

DENOISING_MSE = MetricSpec("Denoising MSE (ε-prediction)", higher_is_better=False, fmt=".4g")


def linear_alpha_bar(steps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """ᾱ_t = Π_{s ≤ t} (1 − β_s) for the linear schedule β_s from ``beta_start`` to
    ``beta_end`` over ``steps`` steps → [steps] (computed in float64, returned float32)."""
    betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, 0).to(torch.float32)


@dataclass(frozen=True)
class DiffusionTask:
    """DDPM ε-prediction on unlabelled images with a denoiser ``model(x_t, t)``."""

    steps: int = 100  # T
    beta_start: float = 1e-4  # β_1 (DDPM's value)
    beta_end: float = 0.02  # β_T (DDPM's value)
    eval_seed: int = 0  # the evaluation stream: torch_generator(eval_seed, "diffusion-eval")
    sample_steps: int = 20  # S: DDIM steps of sampling
    groups: Groups = ONE_MODEL
    labelled: bool = field(default=False, init=False)
    headline: str = field(default="mse", init=False)
    tables: tuple[str, ...] = field(default=("mse",), init=False)
    plain_cross_entropy: bool = field(default=False, init=False)
    local_update: LocalUpdate | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.steps < 1 or not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(
                "a diffusion schedule needs steps >= 1 and 0 < beta_start <= beta_end < 1"
            )
        if self.sample_steps < 1:  # S <= T is the config's check (DiffusionTaskConfig)
            raise ValueError(f"sample_steps must be >= 1, got {self.sample_steps}")

    @cached_property
    def alpha_bar(self) -> torch.Tensor:
        """ᾱ_t for t = 0 … T−1 → [T]."""
        return linear_alpha_bar(self.steps, self.beta_start, self.beta_end)

    @property
    def metrics(self) -> Mapping[str, MetricSpec]:
        return {"mse": DENOISING_MSE}

    @property
    def masked(self) -> Masked:
        return Masked(self.draw, self._masked_loss)

    def draw(self, batch: Batch, generator: torch.Generator) -> Draws:
        """(t [B] int64, ε [B, ...]) for a batch x [B, ...], on x's device."""
        x = _images(batch)
        t = torch.randint(0, self.steps, (len(x),), generator=generator)
        eps = torch.randn(x.shape, generator=generator)
        return t.to(x.device), eps.to(x.device)

    def noised(self, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x + √(1 − ᾱ_t) ε (eq. 4), per sample."""
        ab = self.alpha_bar.to(x.device)[t].view(-1, *([1] * (x.dim() - 1)))
        return ab.sqrt() * x + (1.0 - ab).sqrt() * eps

    def loss(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        x = _images(batch)
        t, eps = self.draw(x, generator)
        return F.mse_loss(model(self.noised(x, t, eps), t), eps)

    def _masked_loss(
        self, model: nn.Module, batch: Batch, mask: torch.Tensor, draws: Draws
    ) -> torch.Tensor:
        x = _images(batch)
        t, eps = draws
        per_sample = (model(self.noised(x, t, eps), t) - eps).pow(2).flatten(1).mean(1)
        return (per_sample * mask).sum() / mask.sum()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: ArrayDataset, batch_size: int) -> dict[str, float]:
        device = device_of(model)
        t, eps = self.draw(data.x, torch_generator(self.eval_seed, "diffusion-eval"))
        total = 0.0
        for i in range(0, len(data), batch_size):
            x = data.x[i : i + batch_size].to(device)
            tb, eb = t[i : i + batch_size].to(device), eps[i : i + batch_size].to(device)
            total += F.mse_loss(model(self.noised(x, tb, eb), tb), eb, reduction="sum").item()
        return {"mse": total / data.x.numel()}


def ddim_scheduler(task: DiffusionTask) -> Any:
    """diffusers' ``DDIMScheduler`` over the task's schedule (T, linear β from ``beta_start``
    to ``beta_end``; ᾱ equal to :attr:`DiffusionTask.alpha_bar` to float rounding), ε
    prediction, no clipping of x̂_0, ᾱ_{-1} = 1 for the last step ("leading" spacing:
    timesteps T/S·(S−1), …, T/S, 0). Needs the ``diffusion`` extra."""
    from fedtier.models.unet import require_diffusers

    diffusers = require_diffusers()
    return diffusers.DDIMScheduler(
        num_train_timesteps=task.steps,
        beta_start=task.beta_start,
        beta_end=task.beta_end,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=True,
        prediction_type="epsilon",
    )


@torch.no_grad()
def sample(
    model: nn.Module,
    scheduler: Any,
    x: torch.Tensor,
    steps: int,
    start: int = 0,
    stop: int | None = None,
    clip_x0: bool = False,
) -> torch.Tensor:
    """Run DDIM steps ``start`` … ``stop − 1`` (of ``steps`` = S, η = 0) on ``x`` [B, C, H, W]
    and return the result [B, C, H, W]: from x_T (``start`` = 0) the whole chain gives x_0;
    ``stop`` = t gives the intermediate x_{T−t} that :func:`sample` with ``start`` = t
    continues from, bit for bit as one call would.

    ``scheduler`` is a ``DDIMScheduler`` (:func:`ddim_scheduler`); a copy with S timesteps is
    used, so the caller's is never changed. ``clip_x0``: clamp the predicted x̂_0 to
    [−1, 1] at every step (BadDiffusion's inference-time clipping, diffusers'
    ``clip_sample``: the direction term keeps the predicted ε). ``model`` is put in eval mode. The steps draw no randomness (η = 0).
    """
    stop = steps if stop is None else stop
    if steps < 1:
        raise FedtierError(f"sampling needs at least one step, got steps = {steps}")
    if not 0 <= start <= stop <= steps:
        raise FedtierError(
            f"sampling steps {start}..{stop} are outside the S = {steps} DDIM steps: "
            f"need 0 <= start <= stop <= {steps} (the edge's shared steps t may be at most S)"
        )
    sched = type(scheduler).from_config(
        scheduler.config, clip_sample=clip_x0, clip_sample_range=1.0
    )
    sched.set_timesteps(steps)
    model.eval()
    device = device_of(model)
    x = x.to(device)
    for t in sched.timesteps[start:stop]:
        tt = torch.full((len(x),), int(t), dtype=torch.long, device=device)
        x = sched.step(model(x, tt), int(t), x).prev_sample
    return x


def collaborative_sample(
    model: nn.Module,
    scheduler: Any,
    x_T: torch.Tensor,
    steps: int,
    shared: int,
    clip_x0: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SS-Diff's collaborative sampling (SPEC §8): the edge runs the first ``shared`` = t of
    the S = ``steps`` DDIM steps on the whole batch x_T [B, ...] and returns x_{T−t}; the
    devices finish the remaining S − t steps. Returns (x_0, x_{T−t}); t = 0 is device-only
    sampling (x_{T−0} = x_T), t = S edge-only (x_0 = x_{T−S}). ``clip_x0``: both parts clamp
    the predicted x̂_0 (see :func:`sample`)."""
    if not 0 <= shared <= steps:
        raise FedtierError(
            f"collaborative sampling: the edge's shared steps t = {shared} must be in "
            f"0..{steps} (the S sampling steps)"
        )
    middle = sample(model, scheduler, x_T, steps, 0, shared, clip_x0)
    return sample(model, scheduler, middle, steps, shared, steps, clip_x0), middle


def _images(batch: Batch) -> torch.Tensor:
    if isinstance(batch, tuple):
        raise TypeError("a diffusion task's batch is x alone (it is unlabelled)")
    return batch
