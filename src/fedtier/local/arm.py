"""One arm's setup and the clients' side of a round, shared by the executors, the attacks
and the round loop (which sits above them): :class:`ArmSetup`, the reference executor
(:func:`train_sequential`: each client a plain :class:`~fedtier.local.jobs.ClientJob` run by
:func:`~fedtier.local.jobs.run_job`, as in the worker processes), where a client starts and
what it uploads (FedBN's device-kept state), and the round plan an edge step belongs to.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from fedtier.config import Config, dp_mechanism
from fedtier.data import ArrayDataset
from fedtier.local.jobs import ClientJob, JobContext, run_job
from fedtier.local.precision import resolve_precision
from fedtier.quant import QuantSpec
from fedtier.state import StateLayout
from fedtier.tasks import Batch, ClientTask, LocalConfig, client_batch
from fedtier.topology import RoundPlan, Topology, plan_round
from fedtier.upload.chain import Chain

if TYPE_CHECKING:
    from fedtier.rounds import TierProgram
    from fedtier.upload import UploadContext

Metrics = dict[str, float]


@dataclass
class ArmSetup:
    """Everything one arm needs; built by :func:`fedtier.experiment.prepare_arm`."""

    cfg: Config
    model: nn.Module  # one working model, reused by every client (no per-client copies)
    task: ClientTask
    layout: StateLayout
    # client id → (x, y): a ClientData (plain data, picklable) in every arm fedtier builds
    client_data: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
    test: ArrayDataset
    topology: Topology
    spec: QuantSpec
    target_bits: list[int]
    election: dict | None = None  # the vote that chose target_bits (None when configured)
    upload: Chain = field(default_factory=Chain)  # client → edge stages
    executor: Callable[[ArmSetup, torch.Tensor, list[int], int], torch.Tensor] | None = None
    # FedBN: the device-kept part of each client's state. It is the RunState's ``device``
    # (bound by :func:`fedtier.rounds.bind_state`); executors read and write it through client_start/delta.
    local_state: dict[int, torch.Tensor] = field(default_factory=dict)
    executor_name: str = "sequential"  # which executor trains the clients (fedtier.local.select)
    costs: Any = None  # fedtier.costs.CostModel: bytes, simulated time and energy (None = off)
    # edge-side screening of uploads before the rule: (setup, w_edge, deltas, ctx) →
    # (kept [C] bool, metrics); rejected rows are dropped (fedtier.defenses.qcheck)
    screen: (
        Callable[
            [ArmSetup, torch.Tensor, torch.Tensor, UploadContext], tuple[torch.Tensor, Metrics]
        ]
        | None
    ) = None
    # after each server step: (w, round) → (w, metrics) (global clipping, server noise)
    post_step: Callable[[torch.Tensor, int], tuple[torch.Tensor, Metrics]] | None = None
    malicious: frozenset[int] = frozenset()  # for counting rejected honest/malicious updates
    attack: Any = None  # the arm's fedtier.attacks.Attack (its summary goes in summary.json)
    # what a device, an edge and the cloud do each round (fedtier.rounds.TierProgram);
    # None = the default steps (fedtier.rounds.default_program)
    program: TierProgram | None = None
    # the executor's worker processes, when it has them (fedtier.local.parallel.ProcessExecutor):
    # :func:`map_jobs` runs the screen's per-upload work there
    workers: Any = None

    def __post_init__(self) -> None:
        self.upload_mask = self.layout.mask()
        if self.executor is None:
            self.executor = train_sequential


Job = TypeVar("Job")
Result = TypeVar("Result")


def map_jobs(
    setup: ArmSetup, fn: Callable[[JobContext, Job], Result], jobs: list[Job]
) -> list[Result]:
    """``[fn(context, job) for job in jobs]``, ``context`` the arm's fixed parts (a working
    model, the task, the layout: :func:`job_context`) into whose model each job loads what it
    needs: side by side in the executor's worker processes when it has them and they run
    the model as this process does (one thread, the same memory layout: the same numbers),
    else here, in ``setup.model``. ``fn`` is a module-level function; jobs are tuples of
    plain data (tensors, numbers, lists, frozen dataclasses) and so are its results."""
    workers = setup.workers
    if workers is not None and len(jobs) > 1:
        out = workers.map(setup, fn, jobs)
        if out is not None:
            return out  # type: ignore[no-any-return]
    context = job_context(setup)
    return [fn(context, job) for job in jobs]


def round_plan(setup: ArmSetup, step: int) -> RoundPlan | None:
    """The plan of the synchronous round that edge step ``step`` belongs to; None under an
    asynchronous schedule, whose executor calls are not rounds."""
    cfg = setup.cfg
    if cfg.schedule.name != "sync":
        return None
    t = step // cfg.aggregate.edge_rounds
    return plan_round(setup.topology, cfg.topology, cfg.seed, t, poisson=is_private(cfg))


def is_private(cfg: Config) -> bool:
    """DP arms sample clients by Poisson sampling (what their accountant analyses)."""
    return dp_mechanism(cfg) is not None


def train_sequential(
    setup: ArmSetup, w: torch.Tensor, clients: list[int], step: int
) -> torch.Tensor:
    """The reference executor: clients one after another in one working model → [C, P]."""
    return torch.stack([client_update(setup, w, c, step) for c in clients])


def client_update(setup: ArmSetup, w: torch.Tensor, client: int, step: int) -> torch.Tensor:
    """Δ_i = w_{t,E}^i − w_t for one client (zero where the state is kept on the device):
    its job (:func:`client_job`) run in the arm's own model (:func:`fedtier.local.jobs.run_job`)."""
    job = client_job(setup, w, client, step)
    result = run_job(job_context(setup), job)
    return client_delta(setup, client, job.start, result.state)


def client_job(
    setup: ArmSetup, w: torch.Tensor, client: int, step: int, data: Batch | None = None
) -> ClientJob:
    """The job of ``client`` at edge step ``step`` from the global (or edge) state w [P]:
    it starts from :func:`client_start`; ``data`` None refers to the client's samples by id."""
    start = client_start(setup, w, client)
    return ClientJob(client, step, setup.cfg.seed, start, local_config(setup.cfg), data)


def client_jobs(
    setup: ArmSetup, w: torch.Tensor, clients: list[int], step: int, by_id: bool
) -> list[ClientJob]:
    """The jobs of ``clients`` from w [P], in ``clients`` order, for workers away from this
    process: ``by_id`` when the workers hold the arm's client data (jobs refer to their
    samples by client id), else each job carries its client's samples."""
    return [
        client_job(
            setup, w, c, step, None if by_id else client_batch(setup.task, *setup.client_data(c))
        )
        for c in clients
    ]


def job_context(setup: ArmSetup, channels_last: bool = False) -> JobContext:
    """The arm's fixed parts for :func:`fedtier.local.jobs.run_job`: its working model, task,
    layout and client data."""
    return JobContext(setup.model, setup.task, setup.layout, setup.client_data, channels_last)


def local_config(cfg: Config) -> LocalConfig:
    """The local-training settings of ``cfg.train`` (``auto`` precision resolved for the
    device the run trains on)."""
    t = cfg.train
    device = (
        "cuda"
        if t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
        else "cpu"
    )
    precision = resolve_precision(t.precision, device)
    return LocalConfig(
        t.epochs, t.batch_size, t.lr, t.momentum, t.weight_decay, precision, t.optimizer
    )


def client_start(setup: ArmSetup, w: torch.Tensor, client: int) -> torch.Tensor:
    """The state [P] a client starts from: w, with FedBN's device-kept entries restored."""
    if client in setup.local_state:
        return torch.where(setup.upload_mask, w, setup.local_state[client])
    return w


def client_delta(
    setup: ArmSetup, client: int, start: torch.Tensor, new: torch.Tensor
) -> torch.Tensor:
    """Δ_i [P] from a client's start and trained state; keeps the device-kept part (FedBN)."""
    upload = setup.upload_mask
    if not bool(upload.all()):
        setup.local_state[client] = new
    return torch.where(upload, new - start, torch.zeros_like(new))


def client_deltas(
    setup: ArmSetup, clients: list[int], w: torch.Tensor, new: torch.Tensor
) -> torch.Tensor:
    """:func:`client_delta` of every row of ``new`` [C, P] (trained from w, rows in
    ``clients`` order) in one operation; ``new`` is overwritten with the deltas.

    A client's start differs from w only where the state is kept on the device, and the
    delta is zero there, so new − w equals new − start wherever it is uploaded.
    """
    upload = setup.upload_mask
    if bool(upload.all()):
        return new.sub_(w)
    for c, row in zip(clients, new):
        setup.local_state[c] = row.clone()
    return new.sub_(w).masked_fill_(~upload, 0.0)
