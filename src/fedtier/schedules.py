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

from fedtier.local.arm import ArmSetup
from fedtier.metrics import reduce_stages
from fedtier.rounds import (
    RunState,
    bind_state,
    evaluate,
    init_state,
    out_of_time,
    program_of,
    run_rounds,
    sync_state,
    upload,
)
from fedtier.seeding import numpy_rng
from fedtier.topology import expected_sampled, plan_round

Schedule = Callable[..., torch.Tensor]
Checkpoint = Callable[[RunState], None] | None


def staleness_weight(staleness: int | np.ndarray, exponent: float) -> Any:
    """FedAsync's polynomial staleness function s(τ) = (1 + τ)^(−a)."""
    return (1.0 + np.asarray(staleness, dtype=np.float64)) ** (-exponent)


def edge_of(setup: ArmSetup, client: int) -> int:
    return next(e for e, cs in enumerate(setup.topology.edge_clients) if client in cs)


def run_async(
    setup: ArmSetup,
    on_eval: Callable[[dict], None],
    on_round: Callable[[int], None] = lambda t: None,
    state: RunState | None = None,
    on_checkpoint: Checkpoint = None,
) -> torch.Tensor:
    """FedAsync or FedBuff (``cfg.schedule.name``) driven by an event queue on the clock.

    The queue, the updates in flight, the buffer and the dispatch generator are the
    schedule's state (``state.schedule``), so a checkpoint taken at an evaluation resumes
    exactly."""
    cfg, sc = setup.cfg, setup.cfg.schedule
    per_round = max(1, int(round(expected_sampled(setup.topology, cfg.topology))))
    total = cfg.train.rounds * per_round
    state = state if state is not None else init_state(setup)
    bind_state(setup, state)
    q = state.schedule
    program = program_of(setup)

    def dispatch() -> None:
        idle = [c for c in range(setup.topology.num_clients) if c not in q["busy"]]
        client = int(q["rng"].choice(idle))
        step = q["seq"]
        sent = program.device(setup, state, state.w, edge_of(setup, client), [client], step)
        duration = 0.0 if sent.finish_s is None else float(sent.finish_s[0])
        heapq.heappush(q["queue"], (q["now"] + duration, step, client, q["version"]))
        q["payload"][step] = (state.w, sent.deltas[0])
        q["busy"].add(client)
        q["seq"] = step + 1

    if not q:  # a fresh run (a resumed one carries its queue)
        q.update(
            rng=numpy_rng(cfg.seed, "async"),
            version=0,
            now=0.0,
            arrivals=0,
            seq=0,
            queue=[],  # (finish time, seq, client, version)
            payload={},  # seq → (w_start, Δ)
            busy=set(),
            buffer=torch.zeros_like(state.w),
            buffered=0,
            stale=[],
        )
        for _ in range(min(sc.concurrency, setup.topology.num_clients)):
            dispatch()
    while q["arrivals"] < total:
        finish, s, client, started = heapq.heappop(q["queue"])
        if sc.time_budget_s is not None and finish > sc.time_budget_s:
            break
        q["now"] = finish
        w_start, delta = q["payload"].pop(s)
        q["busy"].discard(client)
        tau = q["version"] - started
        q["stale"].append(tau)
        weight = float(staleness_weight(tau, sc.staleness_exponent))
        if sc.name == "fedasync":
            alpha = sc.mixing * weight
            state.w = (1 - alpha) * state.w + alpha * (w_start + delta)
            q["version"] += 1
        else:
            q["buffer"] += weight * delta
            q["buffered"] += 1
            if q["buffered"] == sc.buffer:
                state.w = state.w + sc.server_lr * q["buffer"] / sc.buffer
                q["buffer"].zero_()
                q["buffered"], q["version"] = 0, q["version"] + 1
        q["arrivals"] += 1
        arrivals = q["arrivals"]
        state.round = arrivals // per_round
        if setup.costs is not None:
            setup.costs.relay(q["now"])
        if arrivals % per_round == 0:
            on_round(arrivals // per_round - 1)
        evaluating = arrivals % (cfg.eval.every * per_round) == 0 or arrivals == total
        if evaluating:
            _eval(setup, state, arrivals / per_round, on_eval, q["version"])
        if arrivals < total:
            dispatch()
        if evaluating and on_checkpoint is not None:
            # after the next dispatch, so a resumed run has the same updates in flight
            on_checkpoint(sync_state(setup, state))
    arrivals = q["arrivals"]
    if arrivals % (cfg.eval.every * per_round) != 0 and arrivals != total:
        _eval(setup, state, arrivals / per_round, on_eval, q["version"])
        if on_checkpoint is not None:
            on_checkpoint(sync_state(setup, state))
    return state.w


def _eval(
    setup: ArmSetup,
    state: RunState,
    rounds: float,
    on_eval: Callable[[dict], None],
    version: int,
    w: torch.Tensor | None = None,
) -> None:
    stale: list[int] = state.schedule.get("stale", [])
    record: dict[str, Any] = {
        "round": round(rounds, 3),
        "stages": reduce_stages(state.stages),
        "bits": evaluate(setup, state.w if w is None else w),
        "version": version,
    }
    if stale:
        record["staleness"] = {"mean": float(np.mean(stale)), "max": int(np.max(stale))}
    if setup.costs is not None:
        record["costs"] = setup.costs.snapshot()
    on_eval(record)
    stale.clear()
    state.stages.clear()


def run_gossip(
    setup: ArmSetup,
    on_eval: Callable[[dict], None],
    on_round: Callable[[int], None] = lambda t: None,
    state: RunState | None = None,
    on_checkpoint: Checkpoint = None,
) -> torch.Tensor:
    """Gossip averaging among the clients of each edge, with a cloud consensus every
    ``schedule.cloud_every`` rounds (module docstring). The clients' models since the last
    consensus are the schedule's state (``state.schedule["models"]``)."""
    cfg, sc = setup.cfg, setup.cfg.schedule
    state = state if state is not None else init_state(setup)
    bind_state(setup, state)
    models: dict[int, torch.Tensor] = state.schedule.setdefault("models", {})
    edge_members = {e: set(cs.tolist()) for e, cs in enumerate(setup.topology.edge_clients)}
    while state.round < cfg.train.rounds:
        t = state.round
        plan = plan_round(setup.topology, cfg.topology, cfg.seed, t)
        rng = numpy_rng(cfg.seed, "gossip", t)
        for edge, clients in plan.edges.items():
            start = [
                _gossip_start(models, c, edge_members[edge], sc.peers, state.w, rng)
                for c in clients
            ]
            assert setup.executor is not None
            trained = torch.stack(
                [setup.executor(setup, x, [c], t)[0] for x, c in zip(start, clients)]
            )
            # each client's update as its peers get it
            deltas = upload(setup, state, trained, edge, clients, t).deltas
            trained_models = [x + d for x, d in zip(start, deltas)]
            for i, c in enumerate(clients):
                others = [j for j in range(len(clients)) if j != i]
                n_peers = min(sc.peers, len(others))
                peers: list[int] = (
                    [int(j) for j in rng.choice(others, size=n_peers, replace=False)]
                    if n_peers
                    else []
                )
                models[c] = torch.stack(
                    [trained_models[i], *(trained_models[j] for j in peers)]
                ).mean(0)
        if setup.costs is not None:
            setup.costs.cloud_round(0)
        if (t + 1) % sc.cloud_every == 0 and models:
            # consensus over the clients that trained since the last one (the others still
            # hold w and simply receive the new consensus)
            state.w = torch.stack(list(models.values())).mean(0)
            if setup.costs is not None:
                setup.costs.cloud_round(setup.topology.num_edges, clock=False)
            models.clear()
        state.round = t + 1
        done = out_of_time(setup)
        if (t + 1) % cfg.eval.every == 0 or t + 1 == cfg.train.rounds or done:
            current = torch.stack(list(models.values())).mean(0) if models else state.w
            _eval(setup, state, t + 1, on_eval, t + 1, w=current)
            if on_checkpoint is not None:
                on_checkpoint(sync_state(setup, state))
        on_round(t)
        if done:
            break
    return state.w


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
    state: RunState | None = None,
    on_checkpoint: Checkpoint = None,
) -> torch.Tensor:
    """Train ``setup`` with the schedule named in ``cfg.schedule.name`` (from ``state`` when
    resuming); ``on_checkpoint`` receives the run state after every evaluation."""
    run = SCHEDULES[setup.cfg.schedule.name]
    return run(setup, on_eval, on_round, state=state, on_checkpoint=on_checkpoint)
