"""Local training: the one mini-batch SGD loop of fedtier.

The sequential executor, the process executor and the attackers all train with
:func:`local_sgd`; what differs between them is a hook (adversarial noise training,
gradient-norm constraint, projection, frozen BatchNorm), not a second loop. The vectorised
and dense executors train blocks of clients at once and are tested to agree with it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedtier.local.precision import autocast
from fedtier.seeding import torch_generator
from fedtier.tasks import Batch, ClientTask, LocalConfig, batch_len, batch_to, take
from fedtier.tasks.base import Loss, device_of

__all__ = [
    "Hooks",
    "LocalConfig",
    "batch_schedule",
    "client_generator",
    "local_optimizer",
    "local_sgd",
    "train_client",
]


def client_generator(seed: int, round_: int, client: int) -> torch.Generator:
    """Randomness of one client in one round, independent of who else is sampled."""
    return torch_generator(seed, "local", round_, client)


Params = Sequence[torch.Tensor]


@dataclass(frozen=True)
class Hooks:
    """Optional steps of :func:`local_sgd`, per batch in this order:

    ``perturb(params)`` before the forward pass, returning an undo run after the backward
    pass (adversarial noise training evaluates the gradient at perturbed weights);
    ``on_grad(params)`` after the backward pass (gradient-norm constraint);
    ``after_step(model)`` after the optimiser step (projection onto a constraint set).
    ``freeze_batchnorm`` keeps BatchNorm layers in eval mode (running statistics neither
    used from the batch nor updated).
    """

    perturb: Callable[[Params], Callable[[], None]] | None = None
    on_grad: Callable[[Params], None] | None = None
    after_step: Callable[[nn.Module], None] | None = None
    freeze_batchnorm: bool = False


def train_client(
    model: nn.Module,
    task: ClientTask,
    data: Batch,
    cfg: LocalConfig,
    generator: torch.Generator,
) -> int:
    """One client's local update of ``model`` in place on its ``data`` (x [n, ...], or
    (x, y)): the task's own update if it has one, else :func:`local_sgd` on its loss.
    Returns the number of steps."""
    if task.local_update is not None:
        return task.local_update(model, data, cfg, generator)
    return local_sgd(model, task.loss, data, cfg, generator)


def local_sgd(
    model: nn.Module,
    loss: Loss,
    data: Batch,
    cfg: LocalConfig,
    generator: torch.Generator,
    hooks: Hooks = Hooks(),
) -> int:
    """E epochs of mini-batch SGD on ``loss`` over ``data``; returns the number of steps.

    The batches are :func:`batch_schedule`'s (drawn from ``generator`` first); the loss then
    draws its own randomness from the same generator, step after step. The optimiser
    (:func:`local_optimizer`: SGD or Adam over the parameters that require gradients) is
    fresh for every call: its state stays on the device for the local epochs only, as in
    FedAvg.
    """
    model.train()
    if hooks.freeze_batchnorm:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = local_optimizer(params, cfg)
    device = device_of(model)
    batches = batch_schedule(batch_len(data), cfg, generator, skip_singletons=_has_batchnorm(model))
    for idx in batches:
        batch = batch_to(take(data, idx), device)
        undo = hooks.perturb(params) if hooks.perturb is not None else None
        opt.zero_grad(set_to_none=True)
        with autocast(cfg.precision, device):
            value = loss(model, batch, generator)
        value.backward()
        if undo is not None:
            undo()
        if hooks.on_grad is not None:
            hooks.on_grad(params)
        opt.step()
        if hooks.after_step is not None:
            hooks.after_step(model)
    return len(batches)


def local_optimizer(params: Params, cfg: LocalConfig) -> torch.optim.Optimizer:
    """The optimiser of one local update (``cfg.optimizer``): ``torch.optim.SGD`` (lr,
    momentum, weight decay) or ``torch.optim.Adam`` (lr, weight decay, default betas)."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer != "sgd":
        raise ValueError(f"local optimizer must be 'sgd' or 'adam', got {cfg.optimizer!r}")
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def batch_schedule(
    n: int, cfg: LocalConfig, generator: torch.Generator, *, skip_singletons: bool = False
) -> list[torch.Tensor]:
    """The index batches of E local epochs over n samples, in training order.

    One permutation per epoch from ``generator``; the last batch of an epoch may be short.
    With ``skip_singletons`` (BatchNorm models) a final batch of one sample is dropped, as
    BatchNorm cannot normalise it. Every executor trains on exactly these batches.
    """
    batches = []
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            if skip_singletons and n >= 2 and len(idx) < 2:
                continue  # BatchNorm cannot normalise a batch of one
            batches.append(idx)
    return batches


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
