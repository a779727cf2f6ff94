"""The devices' discriminators D_kj of every region, stacked and trained together.

Each device keeps its own discriminator and its own Adam state; they never leave the device
(seed 001). Here they are stored stacked — one tensor [N, ...] per parameter, row n the n-th
device in region order — so one call trains many devices:

* ``vectorised``: ``torch.func.vmap`` over the rows of ``functional_call`` on one working
  module (FedJAX's ``for_each_client``), every device with its own batch;
* ``sequential``: the same functions, one device after another (the reference executor).

Both take a contiguous block of rows (a region, or all regions at once) as a slice, so the
updates write straight into the stacked state. Speed on CPU (benchmarks/bench_gan.py): the
DCGAN discriminator's work is convolution arithmetic (≈ 3.3 GMAC per device and iteration at
batch 64), which stacking cannot reduce; vmap turns the stacked convolutions into grouped ones,
which oneDNN runs slower than nine plain ones, so ``sequential`` is the configured default and
``vectorised`` is kept for accelerators and tested to agree. The discriminator must be a pure function of
its parameters and its own batch (no buffers, no BatchNorm): ``fedtier.models``'
``dcgan-discriminator`` is. For the same reason a device's real and generated batches go
through one call (the same numbers as two). ``precision`` ``bf16`` (``train.precision``) runs
the devices' forward and backward passes under bf16 autocast, as client training does
(``fedtier.local.precision``); the parameters, their Adam states and the feedback stay fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from fedtier.gan.adam import AdamState, Params, adam_init, adam_update
from fedtier.gan.losses import discriminator_loss, fooling_loss, generator_loss
from fedtier.local.precision import autocast

EXECUTORS = ("vectorised", "sequential")


def check_discriminator(model: nn.Module, name: str) -> None:
    """Refuse a discriminator with buffers (BatchNorm statistics): its output would depend
    on the batch and it could not be stacked per device."""
    buffers = [n for n, _ in model.named_buffers()]
    if buffers:
        from fedtier.errors import ConfigError

        raise ConfigError(
            "gan.discriminator.name",
            name,
            f"a discriminator without buffers (it has {buffers[:3]}; BatchNorm statistics "
            "cannot be stacked per device); e.g. 'dcgan-discriminator'",
        )


@dataclass
class DeviceDiscriminators:
    """All devices' discriminators: ``params`` {name: [N, ...]} and their Adam ``adam``.

    ``model`` is the working module whose structure ``functional_call`` uses (its own
    parameters are never read)."""

    model: nn.Module
    params: Params
    adam: AdamState
    lr: float
    betas: tuple[float, float]
    executor: str = "vectorised"
    precision: str = "fp32"  # fp32, or bf16 autocast of the forward/backward (Adam stays fp32)

    @classmethod
    def stack(
        cls,
        models: list[nn.Module],
        lr: float,
        betas: tuple[float, float],
        executor: str = "vectorised",
        precision: str = "fp32",
    ) -> DeviceDiscriminators:
        """From one initialised module per device (all of one architecture)."""
        if executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
        names = [n for n, _ in models[0].named_parameters()]
        params = {
            n: torch.stack([dict(m.named_parameters())[n].detach() for m in models]).clone()
            for n in names
        }
        return cls(models[0], params, adam_init(params), lr, betas, executor, precision)

    @property
    def count(self) -> int:
        return next(iter(self.params.values())).shape[0]

    def rows(self, block: slice) -> Params:
        """Views [R, ...] of the devices in ``block``."""
        return {n: p[block] for n, p in self.params.items()}

    def step(self, block: slice, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """One discriminator update of the devices in ``block`` (R rows): minimise
        E softplus(−D(x)) + E softplus(D(G(z_d))) on real [R, B, ...] vs fake [R, B, ...] with
        Adam. Returns each device's loss before the update [R]."""
        params = self.rows(block)
        if self.executor == "vectorised":
            grads, losses = vmap(grad_and_value(self._d_loss))(params, real, fake)
        else:
            out = [
                grad_and_value(self._d_loss)({n: p[r] for n, p in params.items()}, real[r], fake[r])
                for r in range(real.shape[0])
            ]
            grads = {n: torch.stack([g[n] for g, _ in out]) for n in params}
            losses = torch.stack([v for _, v in out])
        state = {
            "m": {n: m[block] for n, m in self.adam["m"].items()},
            "v": {n: v[block] for n, v in self.adam["v"].items()},
            "step": {"count": self.adam["step"]["count"][block]},
        }
        adam_update(params, grads, state, self.lr, self.betas)
        return losses.detach()

    def feedback(
        self, block: slice, fake: torch.Tensor, kind: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each device's feedback on generated samples fake [R, B, ...]: the gradient of the
        generator's loss (``kind``, :func:`fedtier.gan.losses.generator_loss`) with respect to
        the samples [R, B, ...], and its fooling loss L_D(G) = E log(1 − D(G(z_g))) [R]."""
        params = self.rows(block)

        def loss(p: Params, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with autocast(self.precision):
                logits = functional_call(self.model, p, (x,)).float()
            return generator_loss(logits, kind), fooling_loss(logits).detach()

        fn = grad_and_value(loss, argnums=1, has_aux=True)
        if self.executor == "vectorised":
            grads, (_, scores) = vmap(fn)(params, fake)
        else:
            out = [fn({n: p[r] for n, p in params.items()}, fake[r]) for r in range(fake.shape[0])]
            grads = torch.stack([g for g, _ in out])
            scores = torch.stack([s for _, (_, s) in out])
        return grads.detach(), scores.detach()

    def _d_loss(self, p: Params, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        # real and fake through one call: the same numbers as two (D has no batch statistics)
        with autocast(self.precision):
            logits = functional_call(self.model, p, (torch.cat([real, fake]),)).float()
        return discriminator_loss(logits[: len(real)], logits[len(real) :])

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"params": self.params, **self.adam}

    def load_state_dict(self, d: dict[str, dict[str, torch.Tensor]]) -> None:
        for n in self.params:
            self.params[n].copy_(d["params"][n])
            for k in ("m", "v"):
                self.adam[k][n].copy_(d[k][n])
        self.adam["step"]["count"].copy_(d["step"]["count"])
