"""Choosing the client executor (``train.executor``), with the choice and its reason logged."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fedtier.local.arm import ArmSetup, train_sequential
from fedtier.local.messages import log, say_once

Executor = Callable[[ArmSetup, torch.Tensor, list[int], int], torch.Tensor]


def is_compute_bound(model: nn.Module) -> bool:
    """True for models with convolutions: per-client conv weights do not batch into larger
    matrix products, so vectorising clients saves only per-step overhead there."""
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


def choose_executor(setup: ArmSetup) -> tuple[str, str]:
    """(executor name, why) for ``setup.cfg.train.executor``, resolving ``auto``."""
    from fedtier.local.dense import not_dense
    from fedtier.local.vectorised import not_sgd, not_vectorisable

    wanted = setup.cfg.train.executor
    if wanted == "sequential":
        return "sequential", "train.executor is 'sequential'"
    reason = not_vectorisable(setup)
    if wanted in ("vectorised", "dense") and reason is not None:
        return "sequential", f"train.executor is '{wanted}' but {reason}"
    # another local optimiser (Adam) rules out only the vectorised executors: the processes
    # and Ray executors run the sequential executor's loop
    if reason is not None and reason != not_sgd(setup):
        return "sequential", reason
    if wanted == "vectorised":
        return "vectorised", "train.executor is 'vectorised'"
    if wanted in ("processes", "ray"):
        return wanted, f"train.executor is '{wanted}'"
    if reason is not None and not is_compute_bound(setup.model):
        return "sequential", reason
    dense_reason = reason or not_dense(setup)
    if wanted == "dense":
        if dense_reason is not None:
            return "vectorised", f"train.executor is 'dense' but {dense_reason}"
        return "dense", "train.executor is 'dense'"
    if dense_reason is None:
        return "dense", (
            "the model is Linear layers trained with plain SGD and the clients are small: "
            "first layer in sample space"
        )
    if is_compute_bound(setup.model):
        from fedtier.local.parallel import available_workers

        on_cpu = next(setup.model.parameters()).device.type == "cpu"
        if on_cpu and available_workers() > 1:
            return "processes", (
                f"the model is convolutional (compute-bound): one single-threaded worker "
                f"per core ({available_workers()})"
            )
        return "sequential", "the model is convolutional (compute-bound) and one core is free"
    return "vectorised", "the model is not convolutional and the clients share one task"


def select_executor(setup: ArmSetup) -> str:
    """Install the executor chosen by :func:`choose_executor` on ``setup``; returns its name.

    The choice is logged at INFO; a fallback from an explicitly requested executor is a
    warning, said once.
    """
    from fedtier.local.dense import train_dense
    from fedtier.local.distributed import RayExecutor
    from fedtier.local.parallel import ProcessExecutor
    from fedtier.local.vectorised import train_vectorised

    name, why = choose_executor(setup)
    ray = setup.cfg.ray
    executors: dict[str, Callable[[], Executor]] = {
        "sequential": lambda: train_sequential,
        "vectorised": lambda: train_vectorised,
        "dense": lambda: train_dense,
        "processes": ProcessExecutor,
        "ray": lambda: RayExecutor(ray.address, ray.num_cpus, ray.max_retries),
    }
    setup.executor = executors[name]()
    setup.workers = setup.executor if isinstance(setup.executor, ProcessExecutor) else None
    message = f"executor: {name} ({why})"
    if setup.cfg.train.executor not in ("auto", name):
        say_once(message)
    else:
        log.info(message)
    return name


def close_executor(setup: ArmSetup) -> None:
    """Release what the arm's executor holds (the process pool's workers, the run's objects
    in Ray's store), if anything."""
    close = getattr(setup.executor, "close", None)
    if close is not None:
        close()
