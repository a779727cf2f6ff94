"""Vectorised client execution: all clients of an edge trained at once with torch.func.

The shape follows FedJAX's ``for_each_client``: the C clients' parameters are stacked
([C, ...] per tensor) and one step of every client is a single ``vmap(grad(loss))`` call
through ``functional_call`` on the shared working model, followed by a functional SGD
update (momentum and weight decay exactly as ``torch.optim.SGD``). The sequential executor
(:func:`fedtier.rounds.train_sequential`) stays the reference, and a test checks both agree.

* Clients train on exactly the batches the sequential executor draws
  (:func:`fedtier.local.sgd.batch_schedule` with the per-(seed, round, client) generator),
  so a client's result does not depend on which clients share its block.
* Clients are sorted by step count, so the clients still training at step k are a prefix
  of the block (a slice, not a copy).
* The task says whether it can be trained this way: its ``masked`` loss
  (:class:`fedtier.tasks.Masked`) takes the random draws of each client's loss as inputs,
  drawn per client from the client's own generator outside ``vmap`` (in the sequential
  executor's order), and a mask of padded rows. A task without one, or with its own local
  update, is trained by the sequential executor.
* Short last batches: for batch-independent models (no BatchNorm), batches are padded to
  the batch size and the padded samples masked out of the mean. Otherwise (BatchNorm
  normalises over the batch, so padding would change it) the active clients are grouped by
  batch length and each group is one call.
* BatchNorm buffers (and QAT's per-precision statistics) are stacked per client too and
  updated in place by the train-mode forward pass, as in the sequential executor.
* Bookkeeping is per block, not per client: each entry's [C, ...] start is one expand and
  copy of w, the deltas are one subtraction of w from the trained [C, P] block (upload mask
  applied once, :func:`fedtier.rounds.client_deltas`), and each step's batch indices and
  mask are built with a few tensor operations.
* Memory: every step allocates the block's gradients afresh; glibc is told to reuse freed
  blocks rather than map fresh pages for them (:func:`_reuse_freed_memory`).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.utils.rnn import pad_sequence

from fedtier.local.arm import ArmSetup, client_deltas, client_start, local_config
from fedtier.local.precision import autocast
from fedtier.local.sgd import LocalConfig, _has_batchnorm, batch_schedule, client_generator
from fedtier.tasks import Batch, Draws, Masked, batch_len, batch_to, client_batch, take


def not_sgd(setup: ArmSetup) -> str | None:
    """Why the local optimiser is not the SGD the vectorised executors implement (None: it is)."""
    optimizer = setup.cfg.train.optimizer
    return None if optimizer == "sgd" else f"the local optimizer is {optimizer!r}, not SGD"


def not_vectorisable(
    setup: ArmSetup, clients: Sequence[int] = (), sgd_only: bool = True
) -> str | None:
    """Why the vectorised executor cannot reproduce the sequential one here (None = it can).
    ``sgd_only`` False: for executors that run the sequential loop in workers (processes,
    Ray), any local optimiser will do."""
    task = setup.task
    optimizer = not_sgd(setup) if sgd_only else None
    if optimizer is not None:
        return optimizer
    if task.local_update is not None:
        return "the task has its own local update"
    if task.masked is None:
        return "the task has no masked loss (random draws and padding as inputs)"
    task_of = getattr(setup, "task_of", None)  # clients with their own loss (attackers)
    if task_of is not None and any(task_of(c) is not setup.task for c in clients):
        return "the sampled clients do not share one task (some train with their own loss)"
    for name, module in setup.model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return (
                f"the model has dropout ({name or 'model'}), whose randomness comes from "
                "torch's global generator and cannot be drawn per client"
            )
    return None


class _TaskLoss(nn.Module):
    """The task's loss as a module, so ``functional_call`` can substitute the model's state."""

    def __init__(self, model: nn.Module, masked: Masked) -> None:
        super().__init__()
        self.model = model
        self.masked = masked

    def forward(self, batch: Batch, mask: torch.Tensor, draws: Draws) -> torch.Tensor:
        return self.masked.loss(self.model, batch, mask, draws)


@dataclass
class _Block:
    """C clients' stacked state: name → [C, ...], split into trained and carried tensors."""

    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    momentum: dict[str, torch.Tensor]


def train_vectorised(
    setup: ArmSetup, w: torch.Tensor, clients: list[int], step: int
) -> torch.Tensor:
    """Train ``clients`` from w together; returns their deltas [C, P] in ``clients`` order.

    Falls back to :func:`fedtier.rounds.train_sequential` (saying why, once) when the
    clients cannot be vectorised exactly (see :func:`not_vectorisable`).
    """
    fallback = sequential_unless("vectorised", setup, w, clients, step)
    if fallback is not None:
        return fallback
    _reuse_freed_memory()
    model = setup.model
    masked = setup.task.masked
    assert masked is not None  # not_vectorisable said so
    local = local_config(setup.cfg)
    batchnorm = _has_batchnorm(model)
    data, schedules, order, generators = block_schedules(setup, clients, step, local, batchnorm)
    ordered = [clients[i] for i in order]
    device = next(model.parameters()).device
    block = _stack(setup, _starts(setup, w, ordered, device), local)
    data_all = _concat([data[i] for i in order], device)
    offsets = torch.tensor([0] + [batch_len(data[i]) for i in order]).cumsum(0)[:-1]
    step_fn = vmap(grad(_loss_of(_TaskLoss(model, masked))))
    model.train()
    steps = [len(schedules[i]) for i in order]
    for k in range(steps[0] if steps else 0):
        active = sum(1 for s in steps if s > k)
        batches = [schedules[order[j]][k] for j in range(active)]
        # each client's draws, from its own generator, in the sequential executor's order
        draw = masked.draw
        draws: list[Draws] = [
            ()
            if draw is None
            else draw(batch_to(take(data[order[j]], batches[j]), device), generators[order[j]])
            for j in range(active)
        ]
        for members, idx, mask in _groups(batches, offsets[:active], not batchnorm):
            sel: slice | torch.Tensor = (
                slice(0, active) if members is None else torch.tensor(members, device=device)
            )
            params = {n: p[sel] for n, p in block.params.items()}
            buffers = {n: b[sel] for n, b in block.buffers.items()}
            rows = range(active) if members is None else members
            drawn = _pad_draws([draws[j] for j in rows], idx.shape[1])
            idx = idx.to(device)
            with autocast(local.precision, device):
                grads = step_fn(params, buffers, take(data_all, idx), mask.to(device), drawn)
            _sgd(block, grads, sel, local)
            del grads  # free before the next step allocates its own (reuses the memory)
            if members is not None:  # gathered copies: write the updated buffers back
                for n, b in buffers.items():
                    block.buffers[n][sel] = b
    new = torch.cat(
        [_get(block, n).reshape(len(clients), -1).float() for n in setup.layout.names], 1
    )
    deltas = client_deltas(setup, ordered, w, new.cpu())
    if order == list(range(len(order))):
        return deltas
    return deltas[torch.tensor(order).argsort()]  # block order → ``clients`` order


def sequential_unless(
    executor: str,
    setup: ArmSetup,
    w: torch.Tensor,
    clients: list[int],
    step: int,
    sgd_only: bool = True,
) -> torch.Tensor | None:
    """The sequential executor's deltas when ``clients`` cannot be trained together exactly
    (saying why, once, on behalf of ``executor``); None when they can. ``sgd_only``: as in
    :func:`not_vectorisable`."""
    reason = not_vectorisable(setup, clients, sgd_only)
    if reason is None:
        return None
    from fedtier.local.arm import train_sequential
    from fedtier.local.messages import say_once

    say_once(f"{executor} executor: falling back to sequential because {reason}")
    return train_sequential(setup, w, clients, step)


def block_schedules(
    setup: ArmSetup, clients: list[int], step: int, local: LocalConfig, skip_singletons: bool
) -> tuple[list[Batch], list[list[torch.Tensor]], list[int], list[torch.Generator]]:
    """(data, batch schedules, order, generators) of ``clients``: each client's data (as the
    task's batches see it), the batches the sequential executor draws for it, the clients'
    positions sorted by decreasing step count (stable, so the clients still training at step
    k are a prefix of the block), and each client's generator after its schedule was drawn
    (the loss's draws continue from there, as in the sequential executor)."""
    seed = setup.cfg.seed
    data = [client_batch(setup.task, *setup.client_data(c)) for c in clients]
    generators = [client_generator(seed, step, c) for c in clients]
    schedules = [
        batch_schedule(batch_len(d), local, g, skip_singletons=skip_singletons)
        for d, g in zip(data, generators)
    ]
    order = sorted(range(len(clients)), key=lambda i: -len(schedules[i]))
    return data, schedules, order, generators


def _concat(data: list[Batch], device: torch.device) -> Batch:
    """The clients' data concatenated along the sample dimension, on ``device``."""
    if isinstance(data[0], tuple):
        parts = zip(*(d for d in data if isinstance(d, tuple)))
        return tuple(torch.cat(list(p)).to(device) for p in parts)
    return torch.cat([d for d in data if isinstance(d, torch.Tensor)]).to(device)


def _pad_draws(draws: list[Draws], length: int) -> Draws:
    """The clients' draws stacked [G, length, ...], each padded with zeros to ``length``."""
    if not draws or not draws[0]:
        return ()
    out = []
    for parts in zip(*draws):
        padded = [
            torch.cat([d, d.new_zeros(length - len(d), *d.shape[1:])]) if len(d) < length else d
            for d in parts
        ]
        out.append(torch.stack(padded))
    return tuple(out)


@functools.cache
def _reuse_freed_memory() -> None:
    """Let glibc's malloc keep freed blocks of up to 32 MB for reuse (once per process).

    Every step allocates the C clients' gradients afresh (one [C, P] block, 16 MB for 50
    MLP clients). By default glibc may serve such a block by a fresh mmap, or trim it off
    the heap when freed, and then each step pays a page fault per 4 kB page, which can cost
    as much as the step's arithmetic. Fixed thresholds (as ``M_MMAP_THRESHOLD`` and
    ``M_TRIM_THRESHOLD`` in mallopt(3)) reuse the memory instead. No-op without glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum on 64-bit systems
        mallopt(_M_TRIM_THRESHOLD, 256 << 20)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers (malloc.h)


def _loss_of(module: _TaskLoss) -> Callable[..., torch.Tensor]:
    def loss(params, buffers, batch, mask, draws):
        state = {f"model.{n}": t for n, t in {**params, **buffers}.items()}
        return functional_call(module, state, (batch, mask, draws))

    return loss


def _starts(
    setup: ArmSetup, w: torch.Tensor, clients: list[int], device: torch.device
) -> dict[str, torch.Tensor]:
    """Each layout entry's start for all clients ([C, ...], :func:`client_start` of each).

    Clients without device-kept state all start from w: each entry is w's slice expanded
    to C copies, with no [C, P] block in between.
    """
    if any(c in setup.local_state for c in clients):
        source = torch.stack([client_start(setup, w, c) for c in clients]).to(device)
    else:
        source = w.to(device).expand(len(clients), -1)
    return {
        name: entry.clone(memory_format=torch.contiguous_format)
        for name, entry in setup.layout.views(source).items()
    }


def _stack(setup: ArmSetup, starts: dict[str, torch.Tensor], local: LocalConfig) -> _Block:
    """Per-client copies of the working model's state from the clients' ``starts``."""
    model = setup.model
    count = len(next(iter(starts.values())))
    param_names = {n for n, _ in model.named_parameters()}
    buffers = {}
    for name, tensor in model.state_dict().items():
        if name in param_names:
            continue
        if name in starts:
            buffers[name] = starts[name].to(tensor.dtype)
        else:  # integer buffers (num_batches_tracked): not state, but mutated by the forward
            buffers[name] = tensor.detach().expand(count, *tensor.shape).clone()
    params = {n: starts[n].to(p.dtype) for n, p in model.named_parameters()}
    momentum = {n: torch.zeros_like(p) for n, p in params.items()} if local.momentum > 0 else {}
    return _Block(params, buffers, momentum)


def _get(block: _Block, name: str) -> torch.Tensor:
    return block.params[name] if name in block.params else block.buffers[name]


def _groups(
    batches: list[torch.Tensor], offsets: torch.Tensor, pad: bool
) -> list[tuple[list[int] | None, torch.Tensor, torch.Tensor]]:
    """(members, indices [G, L], mask [G, L]) per call; members None = all active clients.

    ``batches`` index each client's own samples, ``offsets`` where they start in the block's
    data. With ``pad`` (or equal lengths) every batch is padded to the longest one (padding
    masked out, index 0) and one call serves all; otherwise clients are grouped by length.
    """
    lengths = [len(b) for b in batches]
    if pad or len(set(lengths)) == 1:
        real = torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]
        idx = torch.where(real, pad_sequence(batches, batch_first=True) + offsets[:, None], 0)
        return [(None, idx, real.to(torch.get_default_dtype()))]
    out: list[tuple[list[int] | None, torch.Tensor, torch.Tensor]] = []
    for length in sorted(set(lengths), reverse=True):
        members = [j for j, n in enumerate(lengths) if n == length]
        idx = torch.stack([batches[j] for j in members]) + offsets[members, None]
        out.append((members, idx, torch.ones(len(members), length)))
    return out


@torch.no_grad()
def _sgd(
    block: _Block, grads: dict[str, torch.Tensor], sel: slice | torch.Tensor, cfg: LocalConfig
) -> None:
    """One functional step of ``torch.optim.SGD`` (dampening 0, no Nesterov) on rows ``sel``.

    g ← g + λ·p;  b ← μ·b + g (b = g at the first step: b starts at 0);  p ← p − η·b.
    """
    for name, g in grads.items():
        p = block.params[name]
        rows = p[sel]
        if cfg.weight_decay:
            g = g.add(rows, alpha=cfg.weight_decay)
        if cfg.momentum:
            buf = block.momentum[name][sel].mul_(cfg.momentum).add_(g)
            if not isinstance(sel, slice):
                block.momentum[name][sel] = buf
            g = buf
        if isinstance(sel, slice):
            rows.add_(g, alpha=-cfg.lr)
        else:
            p[sel] = rows.add_(g, alpha=-cfg.lr)
