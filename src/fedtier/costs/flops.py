"""Counting a model's floating-point operations, for the energy model's cycles per sample.

SS-Diff prices local training by C, the CPU cycles to process one sample (SPEC §6). For a
model other than the classifier the device classes were calibrated on, C comes from the
model itself: the FLOPs of one training step on one sample (forward and backward of the
task's loss), counted by ``torch.utils.flop_counter.FlopCounterMode`` — matrix products
and convolutions (2 FLOPs per multiply-add), their backward passes included; element-wise
work (activations, normalisation) is not counted — divided by the device's sustained FLOPs
per cycle.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fedtier.tasks import Batch, ClientTask


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs that ``fn()`` runs (FlopCounterMode's total)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def training_flops(model: nn.Module, task: ClientTask, sample: Batch) -> int:
    """FLOPs of one training step's forward and backward pass of ``task``'s loss on
    ``sample`` (a batch of one), on a copy of ``model`` (the model is not touched)."""
    clone = copy.deepcopy(model).train()

    def step() -> None:
        task.loss(clone, sample, torch.Generator().manual_seed(0)).backward()

    return count_flops(step)
