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
from fedtier.tasks import ClientTask
from fedtier.topology import Topology, expected_sampled, plan_round
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
        mean_update, m = cloud_rule(torch.stack(deltas), torch.tensor(weights))
        _add(stages, "cloud", {k: v for k, v in m.items() if not k.startswith("kept/")})
        w = step.apply(w, mean_update, len(plan.clients))
        if setup.post_step is not None:
            w, m = setup.post_step(w, t)
            _add(stages, "server", m)
        if (t + 1) % cfg.eval.every == 0 or t + 1 == cfg.train.rounds:
            on_eval(
                {
                    "round": t + 1,
                    "plan": plan.to_dict(),
                    "stages": dict(stages),
                    "bits": evaluate(setup, w),
                }
            )
            stages.clear()
        on_round(t)
    return w


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
    w_edge = w
    for k in range(kappa):
        step = t * kappa + k
        assert setup.executor is not None
        deltas = setup.executor(setup, w_edge, clients, step)
        ctx = UploadContext(step, edge, clients, sizes, cfg.seed)
        deltas, m = setup.upload(deltas, ctx)
        _add(stages, "client", m)
        rows, w_rows, kept = deltas, weights, clients
        if setup.screen is not None:
            m = setup.screen(setup, w_edge, deltas, ctx)
            keep = torch.tensor([m.get(f"kept/{i}", 1.0) > 0 for i in range(len(clients))])
            _add(stages, "screen", attribute(m, clients, setup.malicious))
            rows, w_rows = deltas[keep], weights[keep]
            kept = [c for c, flag in zip(clients, keep.tolist()) if flag]
        mean, m = rule(rows, w_rows)
        _add(stages, "edge", attribute(m, kept, setup.malicious))
        w_edge = w_edge + mean
    return w_edge - w, float(weights.sum())


def train_sequential(
    setup: ArmSetup, w: torch.Tensor, clients: list[int], step: int
) -> torch.Tensor:
    """The reference executor: clients one after another in one working model → [C, P]."""
    return torch.stack([client_update(setup, w, c, step) for c in clients])


def client_update(setup: ArmSetup, w: torch.Tensor, client: int, step: int) -> torch.Tensor:
    """Δ_i = w_{t,E}^i − w_t for one client (zero where the state is kept on the device)."""
    cfg, upload = setup.cfg, setup.upload_mask
    start = w
    if client in setup.local_state:  # FedBN: restore the device-kept entries
        start = torch.where(upload, w, setup.local_state[client])
    setup.layout.load(setup.model, start)
    x, y = setup.client_data(client)
    local = LocalConfig(
        cfg.train.epochs,
        cfg.train.batch_size,
        cfg.train.lr,
        cfg.train.momentum,
        cfg.train.weight_decay,
    )
    train_client(setup.model, setup.task, x, y, local, client_generator(cfg.seed, step, client))
    new = setup.layout.flatten(setup.model)
    if not bool(upload.all()):
        setup.local_state[client] = new
    return torch.where(upload, new - start, torch.zeros_like(new))


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


def headline(metrics: Metrics) -> float:
    return float(next(iter(metrics.values())))


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
