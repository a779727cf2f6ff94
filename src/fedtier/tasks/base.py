"""The ClientTask protocol (v2): one contract for classifiers, autoencoders, GANs and
diffusion models.

A task owns

* its model(s) as **named parameter groups** (:class:`Groups`: state-dict name prefixes such
  as ``generator`` and ``discriminator``; a single-model task has one group) and says which
  groups stay on the device, as a state filter that composes with the layout's other filters
  (FedBN's :func:`fedtier.state.keep_batchnorm_local`) — no special cases in the loop;
* its **loss** ``loss(model, batch, generator)``, where ``batch`` is what a client's data
  yields (``(x, y)`` for a supervised task, ``x`` alone for an unlabelled one) and every
  random draw of the loss (noise, timesteps) comes from ``generator``;
* its **local update**: ``local_update`` (None = mini-batch SGD on its loss, the one loop of
  :mod:`fedtier.local.sgd` that every executor and the attackers share);
* its **evaluation** to named metrics, with a :class:`fedtier.metrics.MetricSpec` per metric,
  a headline metric, and the metrics its results are tabulated by (per bit width).

Executors ask a task what it supports (``masked`` for padded blocks of clients,
``plain_cross_entropy`` for the dense executor, a custom ``local_update``); they never test
its class. Wrappers (:func:`fedtier.tasks.qat`, the backdoor evaluation) take a task and
give one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from fedtier.data import ArrayDataset
from fedtier.errors import FedtierError
from fedtier.metrics import MetricSpec

Batch = torch.Tensor | tuple[torch.Tensor, ...]
"""What a client's data yields: ``(x [B, ...], y [B])`` (supervised) or ``x [B, ...]``."""

Draws = tuple[torch.Tensor, ...]
"""The random inputs one loss evaluation draws (e.g. noise ε [B, ...] and timesteps t [B])."""

Loss = Callable[[nn.Module, Batch, torch.Generator], torch.Tensor]
"""(model, batch, generator) → scalar loss; all randomness from the generator."""


@dataclass(frozen=True)
class LocalConfig:
    """Local training settings of one client update (``train.*``)."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    precision: str = "fp32"  # fp32 or bf16: autocast of the forward pass (fedtier.local.precision)
    optimizer: str = "sgd"  # sgd (torch.optim.SGD with momentum) or adam (torch.optim.Adam)


LocalUpdate = Callable[[nn.Module, Batch, LocalConfig, torch.Generator], int]
"""(model, client data, settings, generator) → steps taken; trains the model in place."""


@dataclass(frozen=True)
class Masked:
    """A task's loss over a padded batch, for executors that train blocks of clients at once.

    ``draw(batch, generator)`` draws the loss's random inputs for a (real, unpadded) batch,
    consuming ``generator`` exactly as ``task.loss`` does (None: the loss draws nothing, its
    draws are ``()``); ``loss(model, batch, mask, draws)`` is the loss on the rows where
    ``mask`` [B] is 1, the padded rows (mask 0) contributing nothing. On an unpadded batch,
    ``loss(model, batch, ones, draw(batch, g))`` equals ``task.loss(model, batch, g)``.
    """

    draw: Callable[[Batch, torch.Generator], Draws] | None
    loss: Callable[[nn.Module, Batch, torch.Tensor, Draws], torch.Tensor]


@dataclass(frozen=True)
class Groups:
    """Named parameter groups of a task's model, by state-dict name prefix.

    ``prefixes`` pairs each group with its prefix (``"generator"`` holds ``generator.*``;
    ``""`` holds everything no longer prefix claims). ``kept`` names the groups that stay on
    the device: never uploaded, each device keeping its own (like FedBN's statistics).
    """

    prefixes: tuple[tuple[str, str], ...] = (("model", ""),)
    kept: frozenset[str] = frozenset()

    def group_of(self, name: str) -> str | None:
        """The group of state entry ``name`` (the longest matching prefix), None if none."""
        best: tuple[int, str] | None = None
        for group, prefix in self.prefixes:
            matches = prefix == "" or name == prefix or name.startswith(prefix + ".")
            if matches and (best is None or len(prefix) > best[0]):
                best = (len(prefix), group)
        return None if best is None else best[1]

    def uploads(self, name: str, module: nn.Module) -> bool:
        """A :data:`fedtier.state.StateFilter`: False on the entries of kept groups."""
        return self.group_of(name) not in self.kept

    def check(self, model: nn.Module) -> None:
        """Raise :class:`FedtierError` unless every state entry of ``model`` is in a group and
        every group holds at least one entry."""
        names = list(model.state_dict())
        missing = [n for n in names if self.group_of(n) is None]
        if missing:
            raise FedtierError(
                f"the model's state entry '{missing[0]}' is in none of the task's parameter "
                f"groups {dict(self.prefixes)}"
            )
        used = {self.group_of(n) for n in names}
        empty = [g for g, _ in self.prefixes if g not in used]
        if empty:
            raise FedtierError(
                f"the task's parameter group '{empty[0]}' (prefix "
                f"'{dict(self.prefixes)[empty[0]]}') matches no state entry of the model"
            )
        unknown = self.kept - {g for g, _ in self.prefixes}
        if unknown:
            raise FedtierError(f"kept groups {sorted(unknown)} are not parameter groups")


ONE_MODEL = Groups()
"""One model, one group, everything uploaded."""


class ClientTask(Protocol):
    """One task, shared by every client of a run (see the module docstring)."""

    @property
    def labelled(self) -> bool:
        """True when batches are ``(x, y)``; False when they are ``x`` alone."""
        ...

    @property
    def groups(self) -> Groups:
        """The model's parameter groups and which of them stay on the device."""
        ...

    @property
    def metrics(self) -> Mapping[str, MetricSpec]:
        """The spec of every metric :meth:`evaluate` returns."""
        ...

    @property
    def headline(self) -> str:
        """The metric a progress bar or a one-number summary shows."""
        ...

    @property
    def tables(self) -> tuple[str, ...]:
        """The metrics the report tabulates per bit width, in order."""
        ...

    @property
    def masked(self) -> Masked | None:
        """The loss over padded batches (None: executors that pad cannot train this task)."""
        ...

    @property
    def plain_cross_entropy(self) -> bool:
        """True when the loss is exactly the mean cross-entropy of ``model(x)`` against y."""
        ...

    @property
    def local_update(self) -> LocalUpdate | None:
        """The task's own local update; None = mini-batch SGD on :meth:`loss`."""
        ...

    def loss(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        """Scalar training loss on ``batch``; random draws from ``generator`` only."""
        ...

    def evaluate(self, model: nn.Module, data: ArrayDataset, batch_size: int) -> dict[str, float]:
        """Metrics of ``model`` (already in eval mode) on ``data``, named as in ``metrics``."""
        ...


class TaskWrapper:
    """A task that wraps another, ``self.task``: every part of the protocol is the wrapped
    task's unless the wrapper overrides it (QAT changes the loss; the backdoor evaluation
    adds a metric). Wrappers are frozen dataclasses with a ``task`` field."""

    task: ClientTask

    def loss(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        return self.task.loss(model, batch, generator)

    def evaluate(self, model: nn.Module, data: ArrayDataset, batch_size: int) -> dict[str, float]:
        return self.task.evaluate(model, data, batch_size)

    @property
    def labelled(self) -> bool:
        return self.task.labelled

    @property
    def groups(self) -> Groups:
        return self.task.groups

    @property
    def metrics(self) -> Mapping[str, MetricSpec]:
        return self.task.metrics

    @property
    def headline(self) -> str:
        return self.task.headline

    @property
    def tables(self) -> tuple[str, ...]:
        return self.task.tables

    @property
    def masked(self) -> Masked | None:
        return self.task.masked

    @property
    def plain_cross_entropy(self) -> bool:
        return self.task.plain_cross_entropy

    @property
    def local_update(self) -> LocalUpdate | None:
        return self.task.local_update


def client_batch(task: ClientTask, x: torch.Tensor, y: torch.Tensor) -> Batch:
    """What a client's data yields for ``task``: (x, y), or x alone for an unlabelled task."""
    return (x, y) if task.labelled else x


def batch_len(batch: Batch) -> int:
    """Number of samples in ``batch`` (the first dimension of its tensors)."""
    return len(batch[0]) if isinstance(batch, tuple) else len(batch)


def take(batch: Batch, idx: torch.Tensor) -> Batch:
    """The samples ``idx`` of every tensor of ``batch``."""
    return tuple(t[idx] for t in batch) if isinstance(batch, tuple) else batch[idx]


def batch_to(batch: Batch, device: torch.device) -> Batch:
    """``batch`` on ``device``."""
    return tuple(t.to(device) for t in batch) if isinstance(batch, tuple) else batch.to(device)


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return torch.device("cpu") if p is None else p.device
