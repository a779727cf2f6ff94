"""Client execution in worker processes, for compute-bound (convolutional) models on CPU.

Batching clients does not help a CNN whose clients each have their own conv weights: the
matrix products do not get larger. What helps on a multi-core CPU is running clients
side by side in worker processes with one thread each (no thread oversubscription, no
intra-op synchronisation) and channels-last convolutions.

Workers exchange plain data only (:mod:`fedtier.local.jobs`). Each worker receives the
arm's :class:`~fedtier.local.jobs.JobContext` once, when the pool starts: one working model,
the task, the layout and the arm's client data. Per client it receives a
:class:`~fedtier.local.jobs.ClientJob` (client id, seed key, start state [P], local
settings; the client's samples only when the worker could not be given the data), runs it
with :func:`~fedtier.local.jobs.run_job` (the sequential executor's code path, same
per-(seed, step, client) generator) and returns a :class:`~fedtier.local.jobs.ClientResult`.
Nothing crossing is a closure, so the pool starts with ``fork`` or ``spawn``
(``train.start_method``). Clients are dispatched largest first, so the workers finish
together.
"""

from __future__ import annotations

import copy
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from multiprocessing import resource_sharer  # type: ignore[attr-defined]
from multiprocessing.pool import Pool
from typing import Any, Literal

import numpy as np
import torch
import torch.multiprocessing as tmp

from fedtier.data import ClientData
from fedtier.errors import FedtierError
from fedtier.local.arm import ArmSetup, client_delta, client_jobs, job_context
from fedtier.local.jobs import (
    ClientJob,
    ClientResult,
    JobContext,
    default_channels_last,
    run_job,
)
from fedtier.local.messages import say_once

StartMethod = Literal["fork", "spawn"]

_worker: dict[str, JobContext] = {}


def available_workers() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _context(method: StartMethod):  # type: ignore[no-untyped-def]
    """The multiprocessing context of ``method``; spawn where the platform has no fork."""
    if method not in tmp.get_all_start_methods():
        say_once(f"processes executor: start method '{method}' is not available here, using spawn")
        method = "spawn"
    return tmp.get_context(method)


def terminate_pool(pool: Pool, timeout_s: float = 10.0) -> bool:
    """``pool.terminate()`` and ``pool.join()``, given up after ``timeout_s``: CPython's pool
    can wait forever in ``terminate()`` when Ctrl-C lands while its task-handler thread is
    feeding the workers (the handler waits on the queue's lock, ``terminate`` on the handler).
    Its workers are killed either way; the pool's handler threads are daemons, so an
    abandoned one keeps nothing running. Returns True when the pool ended in time."""

    def end() -> None:
        pool.terminate()
        pool.join()

    if sys.is_finalizing():  # no new thread can start now: end it here, as Pool's would
        end()
        return True
    ended = threading.Thread(target=end, name="fedtier-pool-end", daemon=True)
    ended.start()
    ended.join(timeout_s)
    if not ended.is_alive():
        return True
    for worker in list(getattr(pool, "_pool", [])):
        if worker.exitcode is None:
            worker.kill()
            worker.join()
    return False


def _init_worker(context: JobContext) -> None:
    # Ctrl-C reaches the whole process group: only the parent handles it (and terminates the
    # pool); a worker dying of KeyboardInterrupt would print its own traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # the pool stops its workers by SIGTERM: die of it quietly, whatever the parent does
    # with it (an arm process side by side turns it into Ctrl-C for its own clean-up)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    torch.set_num_threads(1)
    # The worker's own working model. Under spawn the context arrives through torch's
    # pickler, which passes tensors as shared memory: the parameters would be the parent's
    # (and every other worker's) very storage. A deep copy makes them private.
    model = copy.deepcopy(context.model)
    if context.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    _worker["context"] = replace(context, model=model)


def _by_value(x: Any) -> Any:
    """Tensors (alone or in a batch tuple) as numpy arrays, which pickle by value. Tensors
    would travel as file descriptors served by a thread of the sending process, and a
    transfer cut by Ctrl-C makes that thread print a traceback."""
    if isinstance(x, torch.Tensor):
        return x.numpy()
    if isinstance(x, (tuple, list)):
        return type(x)(_by_value(v) for v in x)
    return x


def _as_tensors(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if isinstance(x, (tuple, list)):
        return type(x)(_as_tensors(v) for v in x)
    return x


def _run(job: ClientJob) -> ClientResult:
    """A worker's job: arrives and leaves with its tensors as numpy arrays (:func:`_by_value`)."""
    job = replace(job, start=_as_tensors(job.start), data=_as_tensors(job.data))
    result = run_job(_worker["context"], job)
    return replace(result, state=_by_value(result.state))


def _map_one(task: tuple[Callable[..., Any], Any]) -> Any:
    """A worker's :meth:`ProcessExecutor.map` job, its tensors by value both ways."""
    fn, job = task
    return _by_value(fn(_worker["context"], _as_tensors(job)))


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
    lives as long as the executor; ``close()`` or interpreter exit stops it. ``start_method``
    (None: the arm's ``train.start_method``) starts the workers by ``fork`` or ``spawn``.
    ``channels_last`` (default: :func:`fedtier.local.jobs.default_channels_last`, for models
    without BatchNorm or GroupNorm) runs convolutions in NHWC layout; its different
    summation order is harmless for plain CNNs (agreement ~1e-7) but BatchNorm over small
    client batches amplifies it, and GroupNorm is slower in NHWC on CPU, so such models keep
    the sequential layout (and its numbers, bit for bit) by default.

    The arm's client data go to each worker once, with the pool: under ``fork`` whatever
    ``setup.client_data`` is (nothing is pickled), under ``spawn`` when it is a
    :class:`fedtier.data.ClientData` (plain data). Otherwise, or when ``setup.client_data``
    is no longer the one the pool was given, each job carries its client's samples.
    """

    def __init__(
        self,
        workers: int | None = None,
        channels_last: bool | None = None,
        start_method: StartMethod | None = None,
    ) -> None:
        self.workers = workers or available_workers()
        self.channels_last = channels_last
        self.start_method = start_method
        self._pool: Pool | None = None
        self._owner = 0  # the process that started the pool (only it may stop it)
        self._data: object = None  # the client data the workers hold (None: none)

    def _start(self, setup: ArmSetup) -> Pool:
        if self._pool is None:
            channels_last = self.uses_channels_last(setup)
            method = self.start_method or setup.cfg.train.start_method
            ship = method == "fork" or isinstance(setup.client_data, ClientData)
            context = job_context(setup, channels_last)
            if not ship:
                context = replace(context, data=None)
            # multiprocessing.Pool's workers are daemonic: they end with this process even if
            # close() is never called (a ProcessPoolExecutor can hang the interpreter's exit).
            with _sigint_ignored():  # also before a new worker reaches its initializer
                try:
                    self._pool = _context(method).Pool(
                        self.workers, initializer=_init_worker, initargs=(context,)
                    )
                except Exception as e:  # spawn pickles the context; fork pickles nothing
                    raise FedtierError(
                        f"train.start_method '{method}': the arm's model, task or layout cannot "
                        f"be sent to worker processes ({type(e).__name__}: {e}); use "
                        f"train.start_method 'fork' or train.executor 'sequential'"
                    ) from e
            self._data = context.data
            self._owner = os.getpid()
        return self._pool

    def close(self) -> None:
        """Stop the worker processes (the next call starts them again). A forked worker that
        inherited this executor (a later arm's pool, started while this one was alive) leaves
        it alone: the pool is its parent's."""
        if self._pool is not None and self._owner == os.getpid():
            # Jobs and results travel by value (_by_value), but spawn's start-up sends the
            # context's tensors as file descriptors served by this process's resource-sharer
            # thread; stop it before the workers, so a cut transfer prints no traceback (it
            # restarts on the next transfer).
            resource_sharer.stop(timeout=1.0)
            terminate_pool(self._pool)
        self._pool = None
        self._data = None

    def __del__(self) -> None:
        if self._pool is not None and self._owner == os.getpid():
            self._pool.terminate()  # garbage collection, maybe at exit: no helper thread
            self._pool.join()
        self._pool = None

    def uses_channels_last(self, setup: ArmSetup) -> bool:
        """Whether the workers run the model in channels-last layout (:meth:`__init__`)."""
        if self.channels_last is not None:
            return self.channels_last
        return default_channels_last(setup.model)

    def map(self, setup: ArmSetup, fn: Callable[..., Any], jobs: list[Any]) -> list[Any] | None:
        """``[fn(context, job) for job in jobs]`` in the workers, each with its own job
        context (what a job loads into its model is the job's business: client training
        loads its start state anyway); None when the workers run the model in channels-last
        layout, whose sums differ in the last bits from this process's NCHW passes
        (:func:`fedtier.local.arm.map_jobs` then runs the jobs here)."""
        if self.uses_channels_last(setup) or next(setup.model.parameters()).device.type != "cpu":
            return None
        pool = self._start(setup)
        futures = [pool.apply_async(_map_one, ((fn, _by_value(job)),)) for job in jobs]
        return [_as_tensors(f.get()) for f in futures]

    def jobs(
        self, setup: ArmSetup, w: torch.Tensor, clients: list[int], step: int
    ) -> list[ClientJob]:
        """The clients' jobs from w [P], in ``clients`` order; each carries its samples unless
        the workers hold the arm's client data."""
        by_id = self._data is not None and self._data is setup.client_data
        return client_jobs(setup, w, clients, step, by_id)

    def __call__(
        self, setup: ArmSetup, w: torch.Tensor, clients: list[int], step: int
    ) -> torch.Tensor:
        return self.submit(setup, w, clients, step)()

    def submit(
        self, setup: ArmSetup, w: torch.Tensor, clients: list[int], step: int
    ) -> Callable[[], torch.Tensor]:
        """Send the clients' jobs to the workers and return at once; calling the result waits
        for the deltas [C, P] (in ``clients`` order). Meanwhile this process is free: the
        attack executor trains its malicious clients while the workers train the honest ones."""
        from fedtier.local.vectorised import sequential_unless

        fallback = sequential_unless("processes", setup, w, clients, step, sgd_only=False)
        if fallback is not None:
            return lambda: fallback
        pool = self._start(setup)
        jobs = self.jobs(setup, w, clients, step)
        sizes = setup.topology.num_samples
        largest_first = sorted(range(len(jobs)), key=lambda i: -int(sizes[jobs[i].client]))
        sent = {
            i: replace(jobs[i], start=_by_value(jobs[i].start), data=_by_value(jobs[i].data))
            for i in largest_first
        }
        futures = {i: pool.apply_async(_run, (sent[i],)) for i in largest_first}

        def deltas() -> torch.Tensor:
            results = [futures[i].get() for i in range(len(jobs))]
            return torch.stack(
                [
                    client_delta(setup, j.client, j.start, _as_tensors(r.state))
                    for j, r in zip(jobs, results)
                ]
            )

        return deltas
