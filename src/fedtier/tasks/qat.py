"""Quantization-aware training as a wrapper any task can take (QAFed eq. 8).

``qat(task, bits, spec)`` is the task whose loss is

    L(w) = F(w) + Σ_{b∈B} F(Q_b(w))                                        (eq. 8)

with F the wrapped task's loss and F(Q_b(w)) that loss evaluated on the model seen at b
(:func:`fedtier.quant.quantized_view`: a forward with Q_b(w) under the straight-through
estimator, so the full-precision weights receive the gradient of every term; per-precision
BatchNorm statistics when the model keeps them). Algorithm 1 line 11 writes "L ←" inside
the loop over B; it means accumulate, as eq. (8) states.

Every term sees the same random draws: the generator's state is restored before each term,
so the terms differ only in the weights, and the generator ends as after one term.
Evaluation, metrics and parameter groups are the wrapped task's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedtier.quant import QuantSpec, quantized_view
from fedtier.tasks.base import Batch, ClientTask, Draws, LocalUpdate, Masked, TaskWrapper


@dataclass(frozen=True)
class QATTask(TaskWrapper):
    """``task`` trained with the multi-bit loss of eq. (8) over ``bits`` (see the module)."""

    task: ClientTask
    bits: tuple[int, ...]
    spec: QuantSpec = QuantSpec()

    def loss(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        start = generator.get_state()
        total = self.task.loss(model, batch, generator)
        for b in self.bits:
            generator.set_state(start)  # the same draws as the fp32 term
            total = total + self.task.loss(quantized_view(model, self.spec, b), batch, generator)
        return total

    @property
    def masked(self) -> Masked | None:
        inner = self.task.masked
        if inner is None:
            return None
        bits, spec = self.bits, self.spec

        def loss(model: nn.Module, batch: Batch, mask: torch.Tensor, draws: Draws) -> torch.Tensor:
            total = inner.loss(model, batch, mask, draws)
            for b in bits:  # each term of eq. (8) is masked the same way, with the same draws
                total = total + inner.loss(quantized_view(model, spec, b), batch, mask, draws)
            return total

        return Masked(inner.draw, loss)

    @property
    def plain_cross_entropy(self) -> bool:
        return self.task.plain_cross_entropy and not self.bits

    @property
    def local_update(self) -> LocalUpdate | None:
        return None  # SGD on the eq. (8) loss; a wrapped task's own update would bypass it


def qat(task: ClientTask, bits: tuple[int, ...] | list[int], spec: QuantSpec) -> QATTask:
    """``task`` with QAFed's multi-bit QAT loss over ``bits`` (eq. 8); widths ≥ 32 are the
    full-precision term, already present, and are dropped. Raises ``ValueError`` for a task
    with its own local update (its update would not use the eq. 8 loss)."""
    if task.local_update is not None:
        raise ValueError("qat() needs a task trained by SGD on its loss, not its own update")
    return QATTask(task, tuple(b for b in bits if b < 32), spec)
