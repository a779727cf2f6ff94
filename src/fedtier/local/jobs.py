"""Client training as plain data: a :class:`ClientJob` in, a :class:`ClientResult` out.

A job says everything one client's local update needs besides the arm's fixed parts: which
client, the edge step and seed its randomness is keyed by (``fedtier.seeding``: stream
"local", (step, client)), the state it starts from [P], the local settings, and where its
samples are (the client's id into the arm's :class:`fedtier.data.ClientData`, or the tensors
themselves). The fixed parts (working model, task, layout, data) form a :class:`JobContext`,
built once: in the parent for the sequential executor, once per worker process for the
process executor. Jobs, results and contexts are picklable (tensors, numbers, frozen
dataclasses, no closures), so workers may be started by ``fork`` or ``spawn``.

:func:`run_job` is the one code path of a client update: the sequential executor, the
attackers' honest training (:func:`fedtier.local.arm.client_update`) and the worker
processes all call it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from fedtier.local.sgd import client_generator, train_client
from fedtier.state import StateLayout
from fedtier.tasks import Batch, ClientTask, LocalConfig, batch_len, client_batch

Metrics = dict[str, float]


@dataclass(frozen=True, eq=False)
class ClientJob:
    """One client's local update: train from ``start`` [P] on the client's samples."""

    client: int
    step: int  # the edge step (cloud round t · κ + edge round k); keys the client's randomness
    seed: int  # the run's seed
    start: torch.Tensor  # [P] the state the client starts from (FedBN: its own kept entries)
    local: LocalConfig
    data: Batch | None = None  # the client's samples; None: ``client`` in the context's data

    def generator(self) -> torch.Generator:
        """The client's random stream for this step (batch order, then the loss's draws)."""
        return client_generator(self.seed, self.step, self.client)


@dataclass(frozen=True, eq=False)
class ClientResult:
    """What a client update returns: its trained state [P] (the delta and the device-kept
    part are taken from it by :func:`fedtier.local.arm.client_delta`), its weight (number of
    samples) and metrics (``steps``: local SGD steps taken)."""

    client: int
    state: torch.Tensor  # [P] the trained state, float32, layout order
    weight: float  # n_c, the client's number of samples
    metrics: Metrics = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class JobContext:
    """The fixed parts every job of an arm trains with: one working ``model`` (loaded from
    each job's start), the ``task``, the state ``layout``, and the arm's client data (client
    id → (x, y); needed only by jobs that carry no tensors). ``channels_last`` runs image
    batches in NHWC layout (the model must have been converted to match)."""

    model: nn.Module
    task: ClientTask
    layout: StateLayout
    data: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None
    channels_last: bool = False

    def batch(self, job: ClientJob) -> Batch:
        """The job's samples as the task's batches see them."""
        if job.data is not None:
            return job.data
        if self.data is None:
            raise ValueError(f"job of client {job.client} carries no data and the context has none")
        return client_batch(self.task, *self.data(job.client))


def run_job(context: JobContext, job: ClientJob) -> ClientResult:
    """Train one client: load ``job.start`` into the context's model, run the task's local
    update (:func:`fedtier.local.sgd.train_client`: mini-batch SGD on the task's loss unless
    the task brings its own) from the job's generator, and return the trained state."""
    data = context.batch(job)
    if context.channels_last:
        data = channels_last(data)
    context.layout.load(context.model, job.start)
    steps = train_client(context.model, context.task, data, job.local, job.generator())
    state = context.layout.flatten(context.model)
    return ClientResult(job.client, state, float(batch_len(data)), {"steps": float(steps)})


def default_channels_last(model: nn.Module) -> bool:
    """Whether the workers of the process and Ray executors run ``model`` in channels-last
    (NHWC) layout by default: only when it has neither BatchNorm nor GroupNorm.

    NHWC speeds up the convolutions on CPU, but BatchNorm over small client batches
    amplifies its different summation order, and CPU GroupNorm is slower in NHWC than the
    convolutions gain: for ssdiff-mnist's U-Net (GroupNorm after every convolution) a local
    epoch of 10 clients took 4.32 s of CPU in NHWC against 3.93 s in NCHW (medians of 5,
    interleaved in one process; GroupNorm forward and backward 0.72 → 3.07 s, convolutions
    12.4 → 10.1 s under torch.profiler)."""
    norms = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)
    return not any(isinstance(m, norms) for m in model.modules())


def channels_last(data: Batch) -> Batch:
    """The image tensors ([n, C, H, W]) of ``data`` in channels-last layout."""

    def nhwc(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t

    return tuple(nhwc(t) for t in data) if isinstance(data, tuple) else nhwc(data)
