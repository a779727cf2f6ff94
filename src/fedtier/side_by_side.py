"""Arms side by side (``fedtier run --jobs N``): each arm of a run in a process of its own.

A run's arms are independent experiments, each seeded from its own config, so running them
at once changes no number. One arm rarely keeps every core busy (an attacker's solver, a
screen or an evaluation runs in the arm's main process while its client workers wait), and
a second arm fills the gaps.

The arm processes are started with ``spawn`` (a clean interpreter: no forked thread pools)
and send everything back to the parent through one queue, as ``(kind, arm, payload)``:

- ``log``: a metrics record (the parent writes records in the config's arm order);
- ``round`` / ``postfix``: the progress bar;
- ``checkpoint``: the arm's state after a checkpointed evaluation;
- ``prefix``: the state after rounds other arms share (:func:`fedtier.experiment.shared_prefixes`);
- ``done`` with the arm's summary entry, or ``user-error`` / ``error`` / ``interrupted``.

This module only moves messages; what they mean is :mod:`fedtier.experiment`'s business.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from fedtier.errors import FedtierError
from fedtier.local.parallel import available_workers

Message = tuple[str, str, Any]


def resolve_jobs(jobs: int | str | None, arms: int) -> int:
    """How many arms run at once: ``jobs`` (an int ≥ 1, or ``"auto"``: one per core, from
    ``$FEDTIER_JOBS`` when set), never more than the arms there are. A bad value is a
    :class:`FedtierError` naming it."""
    if jobs is None or jobs == "auto":
        env = os.environ.get("FEDTIER_JOBS")
        if env is not None and env.strip() not in ("", "auto"):
            return resolve_jobs(_as_int(env, "FEDTIER_JOBS"), arms)
        return max(1, min(available_workers(), arms))
    n = _as_int(jobs, "--jobs")
    return max(1, min(n, max(arms, 1)))


def _as_int(value: int | str, name: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or str(value).strip() != str(n):
        raise FedtierError(f"{name}: {value!r} is not allowed; give a whole number ≥ 1 or 'auto'")
    return n


class QueueWriter:
    """The run writer as an arm process sees it: records go to the parent, files (models,
    plots) straight into the run directory ``out`` under the arm's own names."""

    def __init__(self, out: Path, channel: Any, arm: str) -> None:
        self.out, self._channel, self._arm = out, channel, arm

    def log(self, record: dict[str, Any]) -> None:
        send(self._channel, "log", self._arm, record)


class QueueBar:
    """The progress bar as an arm process sees it (the parent draws the one bar); the arm's
    own inner bars stay hidden (``disable``)."""

    disable = True

    def __init__(self, channel: Any, arm: str) -> None:
        self._channel, self._arm = channel, arm

    def update(self, n: int = 1) -> None:
        send(self._channel, "round", self._arm, n)

    def set_postfix(self, values: dict[str, Any]) -> None:
        send(self._channel, "postfix", self._arm, values)


class Publish(dict):  # type: ignore[type-arg]
    """A dict whose items (an arm's shared-prefix state) are also sent to the parent."""

    def __init__(self, channel: Any) -> None:
        super().__init__()
        self._channel = channel

    def __setitem__(self, arm: str, value: Any) -> None:
        super().__setitem__(arm, value)
        send(self._channel, "prefix", arm, value)


def send(channel: Any, kind: str, arm: str, payload: Any) -> None:
    """Put a message on the queue with its payload pickled by value here: torch's pickler
    (registered by torch.multiprocessing) would pass tensors as file descriptors that this
    process must still serve when the parent reads them."""
    channel.put((kind, arm, pickle.dumps(payload)))


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def arm_main(
    channel: Any,
    arm: str,
    target: Callable[..., dict[str, Any]],
    args: tuple[Any, ...],
    out: Path,
    threads: int,
    log_level: int | None = None,
) -> None:
    """An arm process: ``target(arm, *args, writer=, bar=, save=, prefixes=)`` with the
    queue-backed writer, bar, checkpoint and prefix hooks; its summary entry (or its error)
    goes back as the last message. SIGTERM stops it as Ctrl-C does (its pool is closed).

    The arm leads a process group of its own, which its workers join: the terminal's Ctrl-C
    reaches the parent only, and the parent stops an arm with everything it started
    (:meth:`ArmProcesses.stop`), including workers it could not close itself."""
    if hasattr(os, "setpgrp"):
        os.setpgrp()
    signal.signal(signal.SIGTERM, _interrupt)
    torch.set_num_threads(threads)
    if log_level is not None:  # the parent shows fedtier's log: so does the arm, named
        log = logging.getLogger("fedtier")
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"fedtier: [{arm}] %(message)s"))
        log.addHandler(handler)
        log.setLevel(log_level)
        log.propagate = False
    try:
        entry = target(
            arm,
            *args,
            writer=QueueWriter(out, channel, arm),
            bar=QueueBar(channel, arm),
            save=lambda progress: send(channel, "checkpoint", arm, progress),
            prefixes=Publish(channel),
        )
        send(channel, "done", arm, entry)
    except KeyboardInterrupt:
        send(channel, "interrupted", arm, None)
    except FedtierError as e:
        send(channel, "user-error", arm, str(e))
    except BaseException:  # anything else: its traceback, for the parent to raise
        send(channel, "error", arm, traceback.format_exc())


class ArmProcesses:
    """Started arm processes and the one queue they report through."""

    def __init__(self) -> None:
        self._ctx = mp.get_context("spawn")
        self._channel = self._ctx.Queue()
        self.running: dict[str, Any] = {}  # arm → its process, until its last message

    def start(
        self,
        arm: str,
        target: Callable[..., dict[str, Any]],
        args: tuple[Any, ...],
        out: Path,
        threads: int,
    ) -> None:
        log = logging.getLogger("fedtier")
        level = log.getEffectiveLevel() if log.handlers else None
        proc = self._ctx.Process(
            target=arm_main,
            args=(self._channel, arm, target, args, out, threads, level),
            name=f"fedtier-arm-{arm}",
        )
        proc.start()
        self.running[arm] = proc

    def messages(self, poll_s: float = 1.0) -> Iterator[Message]:
        """Messages as they come, while an arm runs; an arm whose process dies without its
        last message (killed, out of memory) is an error naming it."""
        while self.running:
            try:
                kind, arm, pickled = self._channel.get(timeout=poll_s)
            except queue_mod.Empty:
                for arm, proc in list(self.running.items()):
                    if not proc.is_alive():
                        del self.running[arm]
                        raise FedtierError(
                            f"arm '{arm}': its process ended (exit code {proc.exitcode}) "
                            f"without finishing; nothing after its last record was kept"
                        ) from None
                continue
            if kind in ("done", "user-error", "error", "interrupted"):
                proc = self.running.pop(arm, None)
                if proc is not None:
                    proc.join()
            yield kind, arm, pickle.loads(pickled)

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop the arms still running: SIGTERM to each arm (it closes its own workers, as
        on Ctrl-C), wait up to ``grace_s``, then SIGKILL whatever is left of the arm's process
        group, so that no worker outlives the run."""
        for proc in self.running.values():
            if proc.is_alive():
                proc.terminate()
        for proc in self.running.values():
            proc.join(grace_s)
            _signal_group(proc, signal.SIGKILL)
            proc.join()
        self.running.clear()


def _signal_group(proc: Any, sig: int) -> None:
    """``sig`` to the process group the arm ``proc`` leads (the arm and its workers); to the
    arm alone while it has not made its group yet."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError, AttributeError):
        if proc.is_alive():
            os.kill(proc.pid, sig)
