"""Client execution on a Ray cluster (``train.executor: ray``; the optional ``ray`` extra).

The same plain jobs as the process executor (:mod:`fedtier.local.parallel`), fanned out as Ray
tasks, one CPU each:

* Ray starts once per process (:func:`connect`): a local Ray with this machine's cores (or
  ``ray.num_cpus``), or a connection to an existing cluster (``ray.address``). Every arm of a
  run, and every later executor of the process, reuses it; Ray's own exit hook shuts it down
  when the process ends (:func:`shutdown` does it earlier).
* The arm's :class:`~fedtier.local.jobs.JobContext` (working model, task, layout and the
  client data, i.e. the data set) goes into Ray's object store once per run (``ray.put``).
  Each worker process fetches it on its first job of the run and keeps it; jobs carry only
  the client id, the seed key, the local settings and a reference to their start state [P],
  which is put once per call for all the clients that start from it.
* A worker runs :func:`~fedtier.local.jobs.run_job`, the sequential executor's code path
  with its per-(seed, step, client) generator, so the deltas equal the sequential
  executor's (bit for bit in NCHW layout; convolutions in channels-last layout, the default
  for models without BatchNorm as in the process executor, agree to ~1e-7).
* A job whose worker process dies (killed, out of memory, a node lost) is run again by Ray
  up to ``ray.max_retries`` times; a job is a pure function of its inputs, so the rerun
  gives the same result. An exception raised by the training itself is not retried.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fedtier
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
from fedtier.local.parallel import _as_tensors, _by_value, available_workers

EXTRA = "pip install 'fedtier[ray]'"


def import_ray() -> Any:
    """The ``ray`` module, or a :class:`FedtierError` naming the extra that installs it."""
    try:
        import ray
    except ImportError as e:
        raise FedtierError(
            f"train.executor 'ray' needs Ray, which is not installed ({e}); install the "
            f"extra: {EXTRA}"
        ) from None
    return ray


def connect(address: str | None = None, num_cpus: int | None = None) -> Any:
    """Ray, connected: reuses a Ray this process is already connected to, else starts a
    local one with ``num_cpus`` CPUs (None: the cores this process may use), or connects to
    the cluster at ``address`` and sends it this process's fedtier package (Ray's
    ``runtime_env`` ``py_modules``), so every node runs the same code. Returns ``ray``."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    if address is not None:
        _check_reachable(address)
    options: dict[str, Any] = {"logging_level": logging.WARNING}
    if address is None:
        options.update(num_cpus=num_cpus or available_workers(), include_dashboard=False)
    else:
        # the cluster's workers run this process's fedtier, sent with the job: the nodes
        # need Ray, torch and fedtier's dependencies, not the same fedtier installed
        options["runtime_env"] = {"py_modules": [str(Path(fedtier.__file__).parent)]}
    with warnings.catch_warnings():  # Ray's notice about future GPU-visibility defaults
        warnings.simplefilter("ignore", FutureWarning)
        try:
            ray.init(address=address, **options)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = f"the cluster at ray.address '{address}'" if address else "a local Ray"
            raise FedtierError(
                f"train.executor 'ray': cannot start or reach {where} ({type(e).__name__}: {e}); "
                "check ray.address (`ray status` on the head node prints it) or leave it null "
                "for a local Ray"
            ) from None
    return ray


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail at once, naming ``ray.address``, when nothing listens at its host and port (Ray
    itself retries an unreachable address for minutes). "auto" is Ray's to resolve."""
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise FedtierError(
            f"ray.address '{address}': nothing answers at {host}:{port} ({e}); start the "
            "cluster's head with `ray start --head` and use the address it prints, or leave "
            "ray.address null for a local Ray"
        ) from None


def shutdown() -> None:
    """Disconnect from Ray (and stop a local Ray this process started), if connected."""
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        ray.shutdown()


# ----------------------------------------------------------------------- worker side

_contexts: dict[str, JobContext] = {}  # in a worker: the current run's context, by its key


def _worker_context(key: str, holder: list[Any]) -> JobContext:
    """The run's context in this worker: fetched from the object store on the worker's
    first job of the run (``holder`` wraps the reference so Ray does not fetch it for
    every job), with the worker's own working model."""
    context = _contexts.get(key)
    if context is None:
        import ray

        context = ray.get(holder[0])
        torch.set_num_threads(1)  # one CPU per task
        model = copy.deepcopy(context.model)
        if context.channels_last:
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        data = context.data
        if isinstance(data, ClientData):  # its index arrays arrive read-only from the store
            data = replace(data, parts=tuple(_writable(p) for p in data.parts))
        context = replace(context, model=model, data=data)
        _contexts.clear()  # one run at a time: drop an earlier run's model and data
        _contexts[key] = context
    return context


def _writable(x: Any) -> Any:
    """Arrays from Ray's object store are read-only views of shared memory; torch wants
    memory it may write, so those are copied."""
    if isinstance(x, np.ndarray) and not x.flags.writeable:
        return x.copy()
    if isinstance(x, tuple):
        return tuple(_writable(v) for v in x)
    return x


def _run_task(key: str, holder: list[Any], start: np.ndarray, job: ClientJob) -> ClientResult:
    """A Ray task: one client job, its start state [P] resolved by Ray from the store."""
    job = replace(job, start=_as_tensors(_writable(start)), data=_as_tensors(job.data))
    result = run_job(_worker_context(key, holder), job)
    return replace(result, state=_by_value(result.state))


# ----------------------------------------------------------------------- driver side


class RayExecutor:
    """An executor (``(setup, w, clients, step) -> deltas [C, P]``) backed by Ray tasks.

    ``address`` / ``num_cpus``: where Ray runs (:func:`connect`); ``max_retries``: reruns of
    a job whose worker died; ``channels_last`` as in the process executor (default: for
    models without BatchNorm or GroupNorm). Constructing it connects to Ray (:func:`connect`: once per
    process), so a missing extra or a wrong address fails before a run starts. ``close()``
    releases the run's objects in the store (Ray keeps running for the process's next run).
    """

    def __init__(
        self,
        address: str | None = None,
        num_cpus: int | None = None,
        max_retries: int = 3,
        channels_last: bool | None = None,
    ) -> None:
        self.address, self.num_cpus = address, num_cpus
        connect(address, num_cpus)  # now, so a wrong address fails before the run starts
        self.max_retries = max_retries
        self.channels_last = channels_last
        self._task: Any = None
        self._holder: list[Any] | None = None  # [the context's reference in the store]
        self._key = ""
        self._data: object = None  # the client data in the stored context (None: none)
        self._session = ""  # the Ray session the context was put in

    def _start(self, setup: ArmSetup) -> None:
        ray = connect(self.address, self.num_cpus)
        runtime = ray.get_runtime_context()
        session = f"{runtime.gcs_address}/{runtime.get_job_id()}"
        if session != self._session:  # Ray was shut down and started again since the last put
            self._holder = None
        self._session = session
        if self._holder is None:
            channels_last = self.channels_last
            if channels_last is None:
                channels_last = default_channels_last(setup.model)
            context = job_context(setup, channels_last)
            if not isinstance(setup.client_data, ClientData):  # not plain data: jobs carry it
                context = replace(context, data=None)
            try:
                self._holder = [ray.put(context)]
            except Exception as e:  # a closure Ray's pickler cannot serialise
                raise FedtierError(
                    f"train.executor 'ray': the arm's model, task or data cannot be sent to "
                    f"Ray workers ({type(e).__name__}: {e}); use train.executor 'processes'"
                ) from e
            self._key = f"{os.getpid()}-{self._holder[0].hex()}"
            self._data = context.data
            self._task = ray.remote(_run_task).options(
                num_cpus=1, max_retries=self.max_retries, retry_exceptions=False
            )

    def close(self) -> None:
        """Release the run's context in the object store (Ray keeps running)."""
        self._holder = None
        self._data = None
        self._task = None

    def jobs(
        self, setup: ArmSetup, w: torch.Tensor, clients: list[int], step: int
    ) -> list[ClientJob]:
        """The clients' jobs from w [P], in ``clients`` order; each carries its samples unless
        the stored context holds the arm's client data."""
        by_id = self._data is not None and self._data is setup.client_data
        return client_jobs(setup, w, clients, step, by_id)

    def __call__(
        self, setup: ArmSetup, w: torch.Tensor, clients: list[int], step: int
    ) -> torch.Tensor:
        from fedtier.local.vectorised import sequential_unless

        fallback = sequential_unless("ray", setup, w, clients, step, sgd_only=False)
        if fallback is not None:
            return fallback
        self._start(setup)
        import ray

        assert self._holder is not None
        jobs = self.jobs(setup, w, clients, step)
        starts: dict[int, Any] = {}  # one stored copy per distinct start state (FedBN: per client)
        for j in jobs:
            if id(j.start) not in starts:
                starts[id(j.start)] = ray.put(j.start.numpy())
        sizes = setup.topology.num_samples
        largest_first = sorted(range(len(jobs)), key=lambda i: -int(sizes[jobs[i].client]))
        refs = {
            i: self._task.remote(
                self._key,
                self._holder,
                starts[id(jobs[i].start)],
                replace(jobs[i], start=torch.empty(0), data=_by_value(jobs[i].data)),
            )
            for i in largest_first
        }
        try:
            results = ray.get([refs[i] for i in range(len(jobs))])
        except ray.exceptions.RayTaskError as e:
            if "failed to import on the worker" not in str(e):
                raise  # the training itself failed: not a setup problem
            raise FedtierError(
                "train.executor 'ray': the Ray workers cannot import fedtier's job code "
                f"({str(e).strip().splitlines()[-1]}); every node needs Ray, torch and "
                "fedtier's dependencies in the same versions as this process"
            ) from None
        return torch.stack(
            [
                client_delta(setup, j.client, j.start, torch.from_numpy(_writable(r.state)))
                for j, r in zip(jobs, results)
            ]
        )
