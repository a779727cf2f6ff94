"""Deployment evaluation: the global model post-training quantized at each bit width."""

from __future__ import annotations

import torch
from torch import nn

from fedtier.data import ArrayDataset
from fedtier.local.jobs import JobContext
from fedtier.quant import QuantSpec, quantize_copy
from fedtier.state import StateLayout
from fedtier.tasks import ClientTask

# (w [P], test x, test y, classes, data set name, test sources, bits, spec, batch size)
WidthJob = tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, int, str, torch.Tensor | None, int, QuantSpec, int
]


def width_job(
    w: torch.Tensor, test: ArrayDataset, bits: int, spec: QuantSpec, batch_size: int
) -> WidthJob:
    """The evaluation of w at ``bits`` on ``test`` as plain data (:func:`evaluate_width`)."""
    return (w, test.x, test.y, test.num_classes, test.name, test.source, bits, spec, batch_size)


def evaluate_width(context: JobContext, job: WidthJob) -> dict[str, float]:
    """The context's task's metrics of Q_b(w) on the test set of ``job`` (:func:`width_job`):
    w is loaded into the context's model, which is only a container (each width is evaluated
    on a quantized *copy*). A job of :func:`fedtier.local.arm.map_jobs`, so that the bit
    widths are evaluated side by side in the executor's workers."""
    w, x, y, classes, name, source, bits, spec, batch_size = job
    context.layout.load(context.model, w)
    quantized = quantize_copy(context.model, spec, bits).eval()
    return context.task.evaluate(quantized, ArrayDataset(x, y, classes, name, source), batch_size)


def evaluate_at_bits(
    model: nn.Module,
    layout: StateLayout,
    w: torch.Tensor,
    task: ClientTask,
    test: ArrayDataset,
    bits: list[int],
    spec: QuantSpec,
    batch_size: int,
) -> dict[str, dict[str, float]]:
    """{bits: metrics} for Q_b(w) at every b in ``bits`` (32 = full precision).

    ``model`` is only a container: w is written into it and each bit width is evaluated on a
    quantized *copy*, never by mutating the model used for training.
    """
    context = JobContext(model, task, layout)
    return {str(b): evaluate_width(context, width_job(w, test, b, spec, batch_size)) for b in bits}
