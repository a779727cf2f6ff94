"""Training schedules on the simulated clock (survey, seed 003; SPEC §1 "other schemes").

All schedules share the clients (``setup.executor``), the upload path (``setup.upload``:
attacks, clipping, codecs) and the cost model (``setup.costs``: bytes, time, energy):

* ``sync`` — the synchronous hierarchical round, :func:`fedtier.rounds.run_rounds`.
* ``fedasync`` — FedAsync (Xie et al., 2019): ``concurrency`` clients train at once; when an
  update arrives (events ordered by the simulated clock) the cloud mixes
  w ← (1 − α_τ) w + α_τ (w_start + Δ), α_τ = α · (1 + τ)^(−a), τ = its staleness in versions.
* ``fedbuff`` — FedBuff (Nguyen et al., 2022): arriving updates, weighted by (1 + τ)^(−a), are
  summed in a buffer; every K arrivals w ← w + η_g · buffer / K.
* ``gossip`` — decentralised averaging among the clients of an edge (GoSGD-style, survey):
  each sampled client trains from its own model (or, when it has not trained since the last
  consensus, from the mean of ``gossip.peers`` random edge peers that have: pull gossip),
  then averages with ``gossip.peers`` random peers of its edge (their updates travel the upload path); every ``gossip.cloud_every``
  rounds the edges and the cloud average the models of the clients that trained since the
  last consensus and send the result to everyone (hierarchical consensus). The evaluated
  model is that average.

In the asynchronous schedules edges relay each update to the cloud as it arrives (no edge
aggregation), a client starts again as soon as its update is delivered, and evaluation
happens every ``eval.every`` × (clients per synchronous round) arrivals; one such block is
reported as a "round" so the curves line up with the synchronous ones. A run stops after
``train.rounds`` round-equivalents or at ``schedule.time_budget_s`` simulated seconds.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fedtier.rounds import ArmSetup, evaluate, out_of_time, run_rounds
from fedtier.seeding import numpy_rng
from fedtier.topology import expected_sampled, plan_round
from fedtier.upload import UploadContext

Schedule = Callable[[ArmSetup, Callable[[dict], None], Callable[[int], None]], torch.Tensor]


def staleness_weight(staleness: int | np.ndarray, exponent: float) -> Any:
    """FedAsync's polynomial staleness function s(τ) = (1 + τ)^(−a)."""
    return (1.0 + np.asarray(staleness, dtype=np.float64)) ** (-exponent)


def _upload_one(
    setup: ArmSetup, w: torch.Tensor, client: int, step: int
) -> tuple[torch.Tensor, float, dict[str, float]]:
    """Train one client from w, send its delta up the upload path, price it on the clock.
    Returns (decoded Δ [P], time until delivered, the stage metrics)."""
    edge = next(e for e, cs in enumerate(setup.topology.edge_clients) if client in cs)
    assert setup.executor is not None
    delta = setup.executor(setup, w, [client], step)
    sizes = torch.tensor([float(setup.topology.num_samples[client])])
    ctx = UploadContext(step, edge, [client], sizes, setup.cfg.seed, radio=setup.costs)
    delta, metrics = setup.upload(delta, ctx)
    duration = 0.0
    if setup.costs is not None:
        uploaded = int(setup.upload_mask.sum())
        duration = float(
            setup.costs.edge_round(edge, [client], ctx.payload_bytes, uploaded).finish_s[0]
        )
    return delta[0], duration, metrics


def run_async(
    setup: ArmSetup,
    on_eval: Callable[[dict], None],
    on_round: Callable[[int], None] = lambda t: None,
) -> torch.Tensor:
    """FedAsync or FedBuff (``cfg.schedule.name``) driven by an event queue on the clock."""
    cfg, sc = setup.cfg, setup.cfg.schedule
    per_round = max(1, int(round(expected_sampled(setup.topology, cfg.topology))))
    total = cfg.train.rounds * per_round
    rng = numpy_rng(cfg.seed, "async")
    w = setup.layout.flatten(setup.model)
    version, now, arrivals, seq = 0, 0.0, 0, 0
    queue: list[tuple[float, int, int, int]] = []  # (finish time, seq, client, version)
    payload: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # seq → (w_start, Δ)
    busy: set[int] = set()
    buffer, buffered = torch.zeros_like(w), 0
    stale: list[int] = []
    stages: dict[str, float] = {}

    def dispatch() -> None:
        nonlocal seq
        idle = [c for c in range(setup.topology.num_clients) if c not in busy]
        client = int(rng.choice(idle))
        delta, duration, m = _upload_one(setup, w, client, seq)
        for k, v in m.items():
            stages[f"client/{k}"] = stages.get(f"client/{k}", 0.0) + v
        heapq.heappush(queue, (now + duration, seq, client, version))
        payload[seq] = (w, delta)
        busy.add(client)
        seq += 1

    for _ in range(min(sc.concurrency, setup.topology.num_clients)):
        dispatch()
    while arrivals < total:
        finish, s, client, started = heapq.heappop(queue)
        if sc.time_budget_s is not None and finish > sc.time_budget_s:
            break
        now = finish
        w_start, delta = payload.pop(s)
        busy.discard(client)
        tau = version - started
        stale.append(tau)
        weight = float(staleness_weight(tau, sc.staleness_exponent))
        if sc.name == "fedasync":
            alpha = sc.mixing * weight
            w = (1 - alpha) * w + alpha * (w_start + delta)
            version += 1
        else:
            buffer += weight * delta
            buffered += 1
            if buffered == sc.buffer:
                w = w + sc.server_lr * buffer / sc.buffer
                buffer.zero_()
                buffered, version = 0, version + 1
        arrivals += 1
        if setup.costs is not None:
            setup.costs.relay(now)
        if arrivals % per_round == 0:
            on_round(arrivals // per_round - 1)
        if arrivals % (cfg.eval.every * per_round) == 0 or arrivals == total:
            _eval(setup, w, arrivals / per_round, stale, stages, on_eval, version)
        if arrivals < total:
            dispatch()
    if arrivals % (cfg.eval.every * per_round) != 0 and arrivals != total:
        _eval(setup, w, arrivals / per_round, stale, stages, on_eval, version)
    return w


def _eval(
    setup: ArmSetup,
    w: torch.Tensor,
    rounds: float,
    stale: list[int],
    stages: dict[str, float],
    on_eval: Callable[[dict], None],
    version: int,
) -> None:
    record: dict[str, Any] = {
        "round": round(rounds, 3),
        "stages": dict(stages),
        "bits": evaluate(setup, w),
        "version": version,
    }
    if stale:
        record["staleness"] = {"mean": float(np.mean(stale)), "max": int(np.max(stale))}
    if setup.costs is not None:
        record["costs"] = setup.costs.snapshot()
    on_eval(record)
    stale.clear()
    stages.clear()


def run_gossip(
    setup: ArmSetup,
    on_eval: Callable[[dict], None],
    on_round: Callable[[int], None] = lambda t: None,
) -> torch.Tensor:
    """Gossip averaging among the clients of each edge, with a cloud consensus every
    ``schedule.cloud_every`` rounds (module docstring)."""
    cfg, sc = setup.cfg, setup.cfg.schedule
    w = setup.layout.flatten(setup.model)
    models: dict[int, torch.Tensor] = {}  # clients that moved away from the last consensus
    stages: dict[str, float] = {}
    edge_members = {e: set(cs.tolist()) for e, cs in enumerate(setup.topology.edge_clients)}
    for t in range(cfg.train.rounds):
        plan = plan_round(setup.topology, cfg.topology, cfg.seed, t)
        rng = numpy_rng(cfg.seed, "gossip", t)
        for edge, clients in plan.edges.items():
            start = [
                _gossip_start(models, c, edge_members[edge], sc.peers, w, rng) for c in clients
            ]
            assert setup.executor is not None
            deltas = torch.stack(
                [setup.executor(setup, x, [c], t)[0] for x, c in zip(start, clients)]
            )
            sizes = torch.tensor([float(setup.topology.num_samples[c]) for c in clients])
            ctx = UploadContext(t, edge, clients, sizes, cfg.seed, radio=setup.costs)
            deltas, m = setup.upload(deltas, ctx)  # each client's update as its peers get it
            for k, v in m.items():
                stages[f"client/{k}"] = stages.get(f"client/{k}", 0.0) + v
            if setup.costs is not None:
                uploaded = int(setup.upload_mask.sum())
                setup.costs.edge_round(edge, clients, ctx.payload_bytes, uploaded)
            trained = [x + d for x, d in zip(start, deltas)]
            for i, c in enumerate(clients):
                others = [j for j in range(len(clients)) if j != i]
                n_peers = min(sc.peers, len(others))
                peers: list[int] = (
                    [int(j) for j in rng.choice(others, size=n_peers, replace=False)]
                    if n_peers
                    else []
                )
                models[c] = torch.stack([trained[i], *(trained[j] for j in peers)]).mean(0)
        if setup.costs is not None:
            setup.costs.cloud_round(0)
        if (t + 1) % sc.cloud_every == 0 and models:
            # consensus over the clients that trained since the last one (the others still
            # hold w and simply receive the new consensus)
            w = torch.stack(list(models.values())).mean(0)
            if setup.costs is not None:
                setup.costs.cloud_round(setup.topology.num_edges, clock=False)
            models.clear()
        done = out_of_time(setup)
        if (t + 1) % cfg.eval.every == 0 or t + 1 == cfg.train.rounds or done:
            current = torch.stack(list(models.values())).mean(0) if models else w
            _eval(setup, current, t + 1, [], stages, on_eval, t + 1)
        on_round(t)
        if done:
            break
    return w


def _gossip_start(
    models: dict[int, torch.Tensor],
    client: int,
    members: set[int],
    peers: int,
    w: torch.Tensor,
    rng: np.random.Generator,
) -> torch.Tensor:
    """Where a client starts: its own model if it has trained since the last consensus;
    otherwise it pulls (averages) the models of up to ``peers`` random clients of its edge
    that have (pull gossip), so progress spreads between consensus rounds; else w."""
    if client in models:
        return models[client]
    holders = sorted(c for c in models if c in members)
    if not holders or peers <= 0:
        return w
    chosen = rng.choice(holders, size=min(peers, len(holders)), replace=False)
    return torch.stack([models[int(c)] for c in chosen]).mean(0)


SCHEDULES: dict[str, Schedule] = {
    "sync": run_rounds,
    "fedasync": run_async,
    "fedbuff": run_async,
    "gossip": run_gossip,
}


def run_schedule(
    setup: ArmSetup,
    on_eval: Callable[[dict], None],
    on_round: Callable[[int], None] = lambda t: None,
) -> torch.Tensor:
    """Train ``setup`` with the schedule named in ``cfg.schedule.name``."""
    return SCHEDULES[setup.cfg.schedule.name](setup, on_eval, on_round)
