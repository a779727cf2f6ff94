"""Sequential local training: E epochs of mini-batch SGD on one client's data."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedtier.seeding import torch_generator
from fedtier.tasks import ClientTask


@dataclass(frozen=True)
class LocalConfig:
    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0


def client_generator(seed: int, round_: int, client: int) -> torch.Generator:
    """Randomness of one client in one round, independent of who else is sampled."""
    return torch_generator(seed, "local", round_, client)


def train_client(
    model: nn.Module,
    task: ClientTask,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: LocalConfig,
    generator: torch.Generator,
) -> int:
    """Train ``model`` in place on (x [n, ...], y [n]); returns the number of SGD steps.

    The optimiser is fresh for every client and round (its momentum stays on the device for
    the duration of the local epochs only), as in FedAvg.
    """
    model.train()
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    device = next(model.parameters()).device
    batches = batch_schedule(len(y), cfg, generator, skip_singletons=_has_batchnorm(model))
    for idx in batches:
        xb, yb = x[idx].to(device), y[idx].to(device)
        opt.zero_grad(set_to_none=True)
        task.loss(model, xb, yb).backward()
        opt.step()
    return len(batches)


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
