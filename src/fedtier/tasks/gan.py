"""An unconditional GAN as a client task: FedAvg of whole GANs (FedGAN-style) through the
ordinary round loop, and the step a centrally trained reference GAN takes.

The model is a :class:`GanPair` holding a generator ``generator`` (z [B, z_dim] → images
[B, C, H, W]) and a discriminator ``discriminator`` (images → one logit [B, 1]); the task's
parameter groups are the two (``generator.*`` and ``discriminator.*``), both uploaded, so
an edge and the cloud average G and D alike (Rasouli et al., FedGAN, 2020).

One GAN step (Goodfellow et al. 2014, with the non-saturating generator loss):

    D:  max  E_x log D(x) + E_z log(1 − D(G(z_d)))      (BCE on real 1 / fake 0)
    G:  max  E_z log D(G(z_g))                           (BCE of D(G(z_g)) against 1)

one Adam step on D, then one on G, with fresh noise z_d and z_g. A device's local update is
``local_steps`` such steps on its own batches, with fresh Adam states (the optimiser stays
on the device for one local update only, as FedAvg's SGD momentum does); the central
reference (:func:`train_central`) takes the same steps with one Adam state throughout.
Every draw (batch order, z) comes from the generator the executor passes (keyed by round
and client, ``fedtier.seeding``), so a run is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from fedtier.data import ArrayDataset
from fedtier.metrics import MetricSpec
from fedtier.seeding import torch_generator
from fedtier.tasks.base import Batch, Groups, LocalConfig, device_of

GAN_GROUPS = Groups((("generator", "generator"), ("discriminator", "discriminator")))
"""G and D as two parameter groups, both uploaded (FedAvg of whole GANs)."""

GAN_METRICS: dict[str, MetricSpec] = {
    "d_loss": MetricSpec("Discriminator loss", higher_is_better=False, fmt=".4g"),
    "g_loss": MetricSpec("Generator loss (non-saturating)", higher_is_better=False, fmt=".4g"),
    "d_accuracy": MetricSpec(
        "Discriminator accuracy (real vs generated)", "%", scale=100.0, fmt=".1f"
    ),
}


class GanPair(nn.Module):
    """A generator and a discriminator in one module (state-dict prefixes ``generator.`` and
    ``discriminator.``), so the flat state [P] of the round loop holds both."""

    def __init__(self, generator: nn.Module, discriminator: nn.Module, z_dim: int) -> None:
        super().__init__()
        self.generator = generator
        self.discriminator = discriminator
        self.z_dim = z_dim

    def noise(self, n: int, rng: torch.Generator) -> torch.Tensor:
        """z ~ N(0, I) [n, z_dim] from ``rng``, on the model's device."""
        return torch.randn(n, self.z_dim, generator=rng).to(device_of(self))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)


def latent_size(generator: nn.Module) -> int:
    """The generator's latent size: its ``z_dim`` attribute, else the input features of its
    first Linear layer."""
    z = getattr(generator, "z_dim", None)
    if isinstance(z, int):
        return z
    first = next((m for m in generator.modules() if isinstance(m, nn.Linear)), None)
    if first is None:
        raise ValueError("the generator has no z_dim attribute and no Linear layer")
    return first.in_features


def d_loss(pair: GanPair, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """−[E log D(x) + E log(1 − D(G(z)))], as mean BCE-with-logits on real (1) and fake (0)."""
    d = pair.discriminator
    lr, lf = d(real).view(-1), d(fake).view(-1)
    return F.binary_cross_entropy_with_logits(
        lr, torch.ones_like(lr)
    ) + F.binary_cross_entropy_with_logits(lf, torch.zeros_like(lf))


def g_loss(pair: GanPair, fake: torch.Tensor, minimax: bool = False) -> torch.Tensor:
    """The generator's loss on G(z): −E log D(G(z)) (non-saturating), or with ``minimax``
    E log(1 − D(G(z))) (the minimax game's own term, = −E softplus(logit))."""
    logits = pair.discriminator(fake).view(-1)
    if minimax:
        return -F.softplus(logits).mean()
    return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))


@dataclass
class GanOptimisers:
    """The two players' Adam optimisers (one state each)."""

    g: torch.optim.Optimizer
    d: torch.optim.Optimizer

    @classmethod
    def of(
        cls, pair: GanPair, lr_g: float, lr_d: float, betas: tuple[float, float]
    ) -> GanOptimisers:
        return cls(
            torch.optim.Adam(pair.generator.parameters(), lr=lr_g, betas=betas),
            torch.optim.Adam(pair.discriminator.parameters(), lr=lr_d, betas=betas),
        )


def gan_step(
    pair: GanPair,
    real: torch.Tensor,
    opt: GanOptimisers,
    rng: torch.Generator,
    minimax: bool = False,
) -> tuple[float, float]:
    """One alternating step on a real batch [B, C, H, W]: Adam on D (real vs G(z_d),
    G frozen), then Adam on G (:func:`g_loss` on G(z_g)); z_d then z_g drawn from ``rng``.
    Returns (D loss, G loss) before the steps."""
    n = len(real)
    with torch.no_grad():
        fake = pair.generator(pair.noise(n, rng))
    opt.d.zero_grad(set_to_none=True)
    ld = d_loss(pair, real, fake)
    ld.backward()
    opt.d.step()
    opt.g.zero_grad(set_to_none=True)
    lg = g_loss(pair, pair.generator(pair.noise(n, rng)), minimax)
    lg.backward()
    opt.g.step()
    pair.discriminator.zero_grad(set_to_none=True)  # G's step left gradients on D
    return float(ld.detach()), float(lg.detach())


def step_batches(n: int, steps: int, batch_size: int, rng: torch.Generator) -> list[torch.Tensor]:
    """``steps`` index batches over n samples: one permutation per epoch from ``rng``, cut
    into batches of ``batch_size`` (an epoch's short last batch is skipped unless it is the
    epoch's only one), for as many epochs as ``steps`` need."""
    if n < 1:
        raise ValueError("a GAN device needs at least one sample")
    batches: list[torch.Tensor] = []
    while len(batches) < steps:
        order = torch.randperm(n, generator=rng)
        cut = [order[i : i + batch_size] for i in range(0, n, batch_size)]
        batches += [b for b in cut if len(b) == batch_size] or cut[:1]
    return batches[:steps]


class Scorer(Protocol):
    """What a GAN task evaluates generated samples with (the in-house judge of
    ``fedtier.generative``): samples [N, C, H, W] → named metrics."""

    @property
    def metrics(self) -> Mapping[str, MetricSpec]: ...

    @property
    def headline(self) -> str: ...

    def __call__(self, samples: torch.Tensor) -> dict[str, float]: ...


@dataclass(frozen=True)
class GanTask:
    """FedAvg of whole GANs: each device's local update is ``local_steps`` alternating Adam
    steps on D and G (:func:`gan_step`; learning rates ``lr_g`` and ``lr_d``, ``betas``;
    the batch size the executor passes), with the minimax generator loss if ``minimax``.

    Evaluation (:meth:`evaluate`): the discriminator's loss and accuracy on ``data`` (real)
    against as many generated samples (z from ``(eval_seed, "gan-eval-d")``), the generator's
    loss, and — with a ``scorer`` — the scorer's metrics of ``eval_samples`` generated samples
    (FID against the data, class coverage…) with z from ``(eval_seed, "gan-sample")``: the
    same z at every evaluation and in every arm (fedtier.gan's sampler draws it so too).
    """

    local_steps: int = 10
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    minimax: bool = False
    scorer: Scorer | None = None
    eval_samples: int = 1000
    eval_seed: int = 0
    groups: Groups = GAN_GROUPS
    labelled: bool = field(default=False, init=False)
    plain_cross_entropy: bool = field(default=False, init=False)
    masked: None = field(default=None, init=False)  # executors that pad blocks cannot train it

    def __post_init__(self) -> None:
        if self.local_steps < 1:
            raise ValueError(f"local_steps must be >= 1, got {self.local_steps}")

    @property
    def metrics(self) -> Mapping[str, MetricSpec]:
        return {**GAN_METRICS, **(self.scorer.metrics if self.scorer is not None else {})}

    @property
    def headline(self) -> str:
        return self.scorer.headline if self.scorer is not None else "g_loss"

    @property
    def tables(self) -> tuple[str, ...]:
        extra = tuple(self.scorer.metrics) if self.scorer is not None else ()
        return (*extra, "d_accuracy")

    @property
    def local_update(self) -> Callable[[nn.Module, Batch, LocalConfig, torch.Generator], int]:
        return self.train_local

    def train_local(
        self, model: nn.Module, data: Batch, cfg: LocalConfig, rng: torch.Generator
    ) -> int:
        """One device's local update in place: ``local_steps`` :func:`gan_step` s on batches
        of ``cfg.batch_size`` of its data (x [n, ...]), with fresh Adam states."""
        pair = _pair(model)
        x = _images(data)
        pair.train()
        opt = GanOptimisers.of(pair, self.lr_g, self.lr_d, self.betas)
        device = device_of(pair)
        for idx in step_batches(len(x), self.local_steps, cfg.batch_size, rng):
            gan_step(pair, x[idx].to(device), opt, rng, self.minimax)
        return self.local_steps

    def loss(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        """The two players' losses summed (D's on ``batch`` vs G(z), then G's), z from
        ``generator``: what one :func:`gan_step` minimises, as one number."""
        pair = _pair(model)
        x = _images(batch)
        fake = pair.generator(pair.noise(len(x), generator))
        return d_loss(pair, x, fake) + g_loss(pair, fake, self.minimax)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: ArrayDataset, batch_size: int) -> dict[str, float]:
        pair = _pair(model)
        pair.eval()
        device = device_of(pair)
        fake = sample(pair, len(data), torch_generator(self.eval_seed, "gan-eval-d"), batch_size)
        d_real, d_fake, total_d, total_g = 0, 0, 0.0, 0.0
        for i in range(0, len(data), batch_size):
            real = data.x[i : i + batch_size].to(device)
            gen = fake[i : i + batch_size].to(device)
            lr, lf = pair.discriminator(real).view(-1), pair.discriminator(gen).view(-1)
            d_real += int((lr > 0).sum())
            d_fake += int((lf < 0).sum())
            total_d += float(
                F.binary_cross_entropy_with_logits(lr, torch.ones_like(lr), reduction="sum")
                + F.binary_cross_entropy_with_logits(lf, torch.zeros_like(lf), reduction="sum")
            )
            total_g += float(
                F.binary_cross_entropy_with_logits(lf, torch.ones_like(lf), reduction="sum")
            )
        m = len(data)
        out = {
            "d_loss": total_d / m,
            "g_loss": total_g / m,
            "d_accuracy": (d_real + d_fake) / (2 * m),
        }
        if self.scorer is not None:
            rng = torch_generator(self.eval_seed, "gan-sample")
            out.update(self.scorer(sample(pair, self.eval_samples, rng, batch_size)))
        return out


@torch.no_grad()
def sample(pair: GanPair, n: int, rng: torch.Generator, batch_size: int = 1000) -> torch.Tensor:
    """n samples [n, C, H, W] of the generator (in its current mode) from z = N(0, I)
    [n, z_dim] drawn from ``rng`` at once (as fedtier.gan's sampler draws it, so both give
    the same z for the same stream), run through G in chunks; returned on the CPU."""
    z = torch.randn(n, pair.z_dim, generator=rng)
    out = [pair.generator(c.to(device_of(pair))).cpu() for c in z.split(batch_size)]
    return torch.cat(out) if out else torch.zeros(0)


def train_central(
    pair: GanPair,
    x: torch.Tensor,
    steps: int,
    batch_size: int,
    task: GanTask,
    seed: int,
    start: int = 0,
    opt: GanOptimisers | None = None,
) -> GanOptimisers:
    """The centrally trained reference: generator steps ``start`` … ``start + steps − 1`` of
    :func:`gan_step` (``task``'s learning rates, betas and generator loss) on the union of
    the data x [N, ...], one Adam state for the whole run (pass the returned ``opt`` back to
    continue). Step s's batch comes from the permutation of stream ``("gan-central", epoch)``
    and its noise from ``("gan-central-z", s)``, so a run cut into pieces draws what one
    uninterrupted run draws."""
    pair.train()
    opt = opt if opt is not None else GanOptimisers.of(pair, task.lr_g, task.lr_d, task.betas)
    device = device_of(pair)
    per_epoch = max(1, len(x) // batch_size)  # full batches only
    for s in range(start, start + steps):
        epoch, k = divmod(s, per_epoch)
        order = torch.randperm(len(x), generator=torch_generator(seed, "gan-central", epoch))
        idx = order[k * batch_size : (k + 1) * batch_size]
        z = torch_generator(seed, "gan-central-z", s)
        gan_step(pair, x[idx].to(device), opt, z, task.minimax)
    return opt


def _pair(model: nn.Module) -> GanPair:
    if not isinstance(model, GanPair):
        raise TypeError(f"a GAN task trains a GanPair (generator + discriminator), got {model}")
    return model


def _images(batch: Batch) -> torch.Tensor:
    if isinstance(batch, tuple):
        raise TypeError("a GAN task's batch is x alone (it is unlabelled)")
    return batch
