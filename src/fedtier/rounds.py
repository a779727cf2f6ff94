"""The synchronous hierarchical round (QAFed Algorithm 1), top to bottom.

    for each cloud round t:
        plan   = which edges, which clients                      (topology.plan_round)
        for each sampled edge s, κ times:
            Δ_i  = local training from the edge model            (setup.executor → local/)
            Δ_i  = upload path: attacks, clipping, noise, codec  (setup.upload → upload/)
            Δ_s  = edge rule over its clients' deltas             (aggregate.RULES)
        Δ      = cloud rule over the edges' deltas
        w      = server step (η_s, N)                             (aggregate.server)
        every eval.every rounds: CDA of Q_b(w) for b in eval bits (evaluate)

Every stage returns metrics under its own name; they are summed between evaluations and
logged with each evaluation record under "stages".
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedtier.aggregate import ServerStep, client_weights
from fedtier.aggregate.robust import build_rule
from fedtier.config import Config
from fedtier.data import ArrayDataset
from fedtier.evaluate import evaluate_at_bits
from fedtier.local import LocalConfig, train_client
from fedtier.local.sgd import client_generator
from fedtier.quant import QuantSpec
from fedtier.state import StateLayout
from fedtier.tasks import ClientTask, client_batch
from fedtier.topology import RoundPlan, Topology, expected_sampled, plan_round
from fedtier.upload import Chain, UploadContext

Metrics = dict[str, float]


@dataclass
class ArmSetup:
    """Everything one arm needs; built by :func:`fedtier.experiment.prepare_arm`."""

    cfg: Config
    model: nn.Module  # one working model, reused by every client (no per-client copies)
    task: ClientTask
    layout: StateLayout
    client_data: Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # client id → (x, y)
    test: ArrayDataset
    topology: Topology
    spec: QuantSpec
    target_bits: list[int]
    election: dict | None = None  # the vote that chose target_bits (None when configured)
    upload: Chain = field(default_factory=Chain)  # client → edge stages
    executor: Callable[[ArmSetup, torch.Tensor, list[int], int], torch.Tensor] | None = None
    local_state: dict[int, torch.Tensor] = field(default_factory=dict)  # FedBN: device-kept part
    executor_name: str = "sequential"  # which executor trains the clients (fedtier.local.select)
    costs: Any = None  # fedtier.costs.CostModel: bytes, simulated time and energy (None = off)
    # edge-side screening of uploads before the rule: (setup, w_edge, deltas, ctx) → metrics
    # with kept/<row> flags; rejected rows are dropped (fedtier.defenses.qcheck)
    screen: Callable[[ArmSetup, torch.Tensor, torch.Tensor, UploadContext], Metrics] | None = None
    # after each server step: (w, round) → (w, metrics) (global clipping, server noise)
    post_step: Callable[[torch.Tensor, int], tuple[torch.Tensor, Metrics]] | None = None
    malicious: frozenset[int] = frozenset()  # for counting rejected honest/malicious updates
    attack: Any = None  # the arm's fedtier.attacks.Attack (its summary goes in summary.json)

    def __post_init__(self) -> None:
        self.upload_mask = self.layout.mask()
        if self.executor is None:
            self.executor = train_sequential


def run_rounds(
    setup: ArmSetup,
    on_eval: Callable[[dict], None],
    on_round: Callable[[int], None] = lambda t: None,
) -> torch.Tensor:
    """Train for cfg.train.rounds cloud rounds; returns the final global state [P]."""
    cfg = setup.cfg
    w = setup.layout.flatten(setup.model)
    step = ServerStep(cfg.aggregate.rule, server_lr(setup), setup.topology.num_clients)
    a = cfg.aggregate
    cloud_rule = build_rule(a.cloud_rule, a.cloud_options, "aggregate.cloud_rule")
    stages: Metrics = defaultdict(float)
    for t in range(cfg.train.rounds):
        plan = plan_round(setup.topology, cfg.topology, cfg.seed, t)
        deltas, weights = [], []
        for edge, clients in plan.edges.items():
            delta, weight = edge_update(setup, w, edge, clients, t, stages)
            deltas.append(delta)
            weights.append(weight)
        if setup.costs is not None:
            setup.costs.cloud_round(len(deltas))
        live = [i for i, weight in enumerate(weights) if weight > 0]  # all may miss the deadline
        if live:
            mean_update, m = cloud_rule(
                torch.stack([deltas[i] for i in live]), torch.tensor([weights[i] for i in live])
            )
            _add(stages, "cloud", {k: v for k, v in m.items() if not k.startswith("kept/")})
            w = step.apply(w, mean_update, len(plan.clients))
            if setup.post_step is not None:
                w, m = setup.post_step(w, t)
                _add(stages, "server", m)
        done = out_of_time(setup)
        if (t + 1) % cfg.eval.every == 0 or t + 1 == cfg.train.rounds or done:
            record = {
                "round": t + 1,
                "plan": plan.to_dict(),
                "stages": dict(stages),
                "bits": evaluate(setup, w),
            }
            if setup.costs is not None:
                record["costs"] = setup.costs.snapshot()
            on_eval(record)
            stages.clear()
        on_round(t)
        if done:
            break
    return w


def round_plan(setup: ArmSetup, step: int) -> RoundPlan | None:
    """The plan of the synchronous round that edge step ``step`` belongs to; None under an
    asynchronous schedule, whose executor calls are not rounds."""
    cfg = setup.cfg
    if cfg.schedule.name != "sync":
        return None
    return plan_round(setup.topology, cfg.topology, cfg.seed, step // cfg.aggregate.edge_rounds)


def out_of_time(setup: ArmSetup) -> bool:
    """True once the simulated clock has reached ``schedule.time_budget_s`` (a synchronous
    run stops at the first round that ends at or after it)."""
    budget = setup.cfg.schedule.time_budget_s
    return budget is not None and setup.costs is not None and setup.costs.totals["time_s"] >= budget


def server_lr(setup: ArmSetup) -> float:
    a = setup.cfg.aggregate
    if a.server_lr is not None:
        return a.server_lr
    if a.rule == "qafed":  # η_s = N / m: the paper's update equals the mean of the deltas
        return setup.topology.num_clients / expected_sampled(setup.topology, setup.cfg.topology)
    return 1.0


def edge_update(
    setup: ArmSetup, w: torch.Tensor, edge: int, clients: list[int], t: int, stages: Metrics
) -> tuple[torch.Tensor, float]:
    """κ edge rounds from w; returns (the edge's update Δ_s [P], its weight at the cloud)."""
    cfg = setup.cfg
    kappa = cfg.aggregate.edge_rounds
    sizes = torch.tensor([float(setup.topology.num_samples[c]) for c in clients])
    weights = client_weights(cfg.aggregate.rule, sizes)
    rule = build_rule(cfg.aggregate.edge_rule, cfg.aggregate.edge_options, "aggregate.edge_rule")
    w_edge, reached = w, False
    if setup.costs is not None:
        clients = setup.costs.schedule(clients)
        sizes, weights = sizes[: len(clients)], weights[: len(clients)]
    for k in range(kappa):
        step = t * kappa + k
        assert setup.executor is not None
        deltas = setup.executor(setup, w_edge, clients, step)
        ctx = UploadContext(step, edge, clients, sizes, cfg.seed, radio=setup.costs)
        deltas, m = setup.upload(deltas, ctx)
        _add(stages, "client", m)
        keep = torch.ones(len(clients), dtype=torch.bool)
        if setup.costs is not None:  # stragglers are dropped at the deadline
            uploaded = int(setup.upload_mask.sum())
            on_time = setup.costs.edge_round(edge, clients, ctx.payload_bytes, uploaded).kept
            keep &= torch.from_numpy(on_time)
        if setup.screen is not None:
            m = setup.screen(setup, w_edge, deltas, ctx)
            keep &= torch.tensor([m.get(f"kept/{i}", 1.0) > 0 for i in range(len(clients))])
            _add(stages, "screen", attribute(m, clients, setup.malicious))
        if not keep.any():
            continue
        if bool(keep.all()):  # no row dropped: aggregate without copying the block
            kept = clients
            mean, m = rule(deltas, weights)
        else:
            kept = [c for c, flag in zip(clients, keep.tolist()) if flag]
            mean, m = rule(deltas[keep], weights[keep])
        _add(stages, "edge", attribute(m, kept, setup.malicious))
        w_edge = w_edge + mean
        reached = True
    return w_edge - w, float(weights.sum()) if reached else 0.0


def train_sequential(
    setup: ArmSetup, w: torch.Tensor, clients: list[int], step: int
) -> torch.Tensor:
    """The reference executor: clients one after another in one working model → [C, P]."""
    return torch.stack([client_update(setup, w, c, step) for c in clients])


def client_update(setup: ArmSetup, w: torch.Tensor, client: int, step: int) -> torch.Tensor:
    """Δ_i = w_{t,E}^i − w_t for one client (zero where the state is kept on the device)."""
    start = client_start(setup, w, client)
    setup.layout.load(setup.model, start)
    x, y = setup.client_data(client)
    local = local_config(setup.cfg)
    generator = client_generator(setup.cfg.seed, step, client)
    train_client(setup.model, setup.task, client_batch(setup.task, x, y), local, generator)
    return client_delta(setup, client, start, setup.layout.flatten(setup.model))


def local_config(cfg: Config) -> LocalConfig:
    """The local-training settings of ``cfg.train``."""
    t = cfg.train
    return LocalConfig(t.epochs, t.batch_size, t.lr, t.momentum, t.weight_decay)


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


def evaluate(setup: ArmSetup, w: torch.Tensor) -> dict[str, Metrics]:
    """Metrics per evaluation bit width; FedBN evaluates with the mean of the devices' BN state."""
    if setup.local_state:
        kept = torch.stack(list(setup.local_state.values())).mean(0)
        w = torch.where(setup.upload_mask, w, kept)
    cfg = setup.cfg
    return evaluate_at_bits(
        setup.model,
        setup.layout,
        w,
        setup.task,
        setup.test,
        cfg.quant.eval_bits,
        setup.spec,
        cfg.eval.batch_size,
    )


def headline(task: ClientTask, metrics: Metrics) -> float:
    """The task's headline metric in ``metrics`` (NaN when it was not measured)."""
    return float(metrics.get(task.headline, float("nan")))


def attribute(metrics: Metrics, clients: list[int], malicious: frozenset[int]) -> Metrics:
    """Turn per-row ``kept/<row>`` flags into counts of rejected honest and malicious updates."""
    out = {k: v for k, v in metrics.items() if not k.startswith("kept/")}
    flags = [metrics.get(f"kept/{i}") for i in range(len(clients))]
    if any(f is not None for f in flags):
        rejected = [c for c, f in zip(clients, flags) if f is not None and f <= 0]
        out["rejected_malicious"] = float(sum(c in malicious for c in rejected))
        out["rejected_honest"] = float(len(rejected) - out["rejected_malicious"])
        out["seen_malicious"] = float(sum(c in malicious for c in clients))
        out["seen_honest"] = float(len(clients) - out["seen_malicious"])
    return out


def _add(total: Metrics, tier: str, metrics: Metrics) -> None:
    for k, v in metrics.items():
        total[f"{tier}/{k}"] += v
