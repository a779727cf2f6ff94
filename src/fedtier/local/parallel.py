"""Client execution in worker processes, for compute-bound (convolutional) models on CPU.

Batching clients does not help a CNN whose clients each have their own conv weights: the
matrix products do not get larger. What helps on a multi-core CPU is running clients
side by side in worker processes with one thread each (no thread oversubscription, no
intra-op synchronisation) and channels-last convolutions. Each worker holds one working
model, built once when the pool starts; per client it receives the start state [P] and the
client's own samples (never the data set), trains with the very function the sequential
executor uses (:func:`fedtier.local.train_client`, same per-(seed, round, client)
generator), and returns the trained state [P]. Clients are dispatched largest first, so the
workers finish together.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing import resource_sharer  # type: ignore[attr-defined]
from multiprocessing.pool import Pool

import torch
import torch.multiprocessing as tmp
from torch import nn

from fedtier.local.arm import ArmSetup, client_delta, client_start, local_config
from fedtier.local.sgd import LocalConfig, _has_batchnorm, client_generator, train_client
from fedtier.state import StateLayout
from fedtier.tasks import Batch, ClientTask, batch_len, client_batch

_worker: dict[str, object] = {}


def available_workers() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _context():  # type: ignore[no-untyped-def]
    """fork where the platform has it: workers share the parent's memory copy-on-write and
    need no ``if __name__ == "__main__"`` guard in the user's script (with one thread each,
    as PyTorch's DataLoader workers do); spawn elsewhere."""
    methods = tmp.get_all_start_methods()
    return tmp.get_context("fork" if "fork" in methods else "spawn")


def _init_worker(model: nn.Module, task: ClientTask, layout: StateLayout, channels_last: bool):
    # Ctrl-C reaches the whole process group: only the parent handles it (and terminates the
    # pool); a worker dying of KeyboardInterrupt would print its own traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    _worker.update(model=model, task=task, layout=layout, channels_last=channels_last)


def _train_one(
    start: torch.Tensor,
    data: Batch,
    local: LocalConfig,
    seed: int,
    step: int,
    client: int,
) -> torch.Tensor:
    model, layout = _worker["model"], _worker["layout"]
    assert isinstance(model, nn.Module) and isinstance(layout, StateLayout)
    layout.load(model, start)
    if _worker["channels_last"]:
        data = _channels_last(data)
    task = _worker["task"]
    train_client(model, task, data, local, client_generator(seed, step, client))  # type: ignore[arg-type]
    return layout.flatten(model)


def _channels_last(data: Batch) -> Batch:
    """The image tensors ([n, C, H, W]) of ``data`` in channels-last layout."""

    def nhwc(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t

    return tuple(nhwc(t) for t in data) if isinstance(data, tuple) else nhwc(data)


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ignore SIGINT while worker processes are started, so they inherit the ignoring (the
    parent's own handler is restored at once). Only the main thread may set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class ProcessExecutor:
    """An executor (``(setup, w, clients, step) -> deltas [C, P]``) backed by a process pool.

    The pool (``workers`` processes, default: one per available core) starts on first use and
    lives as long as the executor; ``close()`` or interpreter exit stops it. ``channels_last``
    (default: for models without BatchNorm) runs convolutions in NHWC layout; its different
    summation order is harmless for plain CNNs (agreement ~1e-7) but BatchNorm over small
    client batches amplifies it, so BatchNorm models keep the sequential layout by default.
    """

    def __init__(self, workers: int | None = None, channels_last: bool | None = None) -> None:
        self.workers = workers or available_workers()
        self.channels_last = channels_last
        self._pool: Pool | None = None

    def _start(self, setup: ArmSetup) -> Pool:
        if self._pool is None:
            channels_last = self.channels_last
            if channels_last is None:
                channels_last = not _has_batchnorm(setup.model)
            # multiprocessing.Pool's workers are daemonic: they end with this process even if
            # close() is never called (a ProcessPoolExecutor can hang the interpreter's exit).
            with _sigint_ignored():  # also before a new worker reaches its initializer
                self._pool = _context().Pool(
                    self.workers,
                    initializer=_init_worker,
                    initargs=(setup.model, setup.task, setup.layout, channels_last),
                )
        return self._pool

    def close(self) -> None:
        """Stop the worker processes (the next call starts them again)."""
        if self._pool is not None:
            # Tensors travel to the workers as file descriptors served by this process's
            # resource-sharer thread; a worker terminated mid-transfer (Ctrl-C during a round)
            # would make that thread print a ConnectionResetError. Stop it first: it restarts
            # on the next transfer, and a worker that cannot fetch its task exits quietly.
            resource_sharer.stop(timeout=1.0)
            self._pool.terminate()
            self._pool.join()
        self._pool = None

    def __del__(self) -> None:
        self.close()

    def __call__(
        self, setup: ArmSetup, w: torch.Tensor, clients: list[int], step: int
    ) -> torch.Tensor:
        from fedtier.local.vectorised import sequential_unless

        fallback = sequential_unless("processes", setup, w, clients, step)
        if fallback is not None:
            return fallback
        pool = self._start(setup)
        local, seed = local_config(setup.cfg), setup.cfg.seed
        starts = {c: client_start(setup, w, c) for c in clients}
        data = {c: client_batch(setup.task, *setup.client_data(c)) for c in clients}
        largest_first = sorted(clients, key=lambda c: -batch_len(data[c]))
        futures = {
            c: pool.apply_async(_train_one, (starts[c], data[c], local, seed, step, c))
            for c in largest_first
        }
        return torch.stack([client_delta(setup, c, starts[c], futures[c].get()) for c in clients])
