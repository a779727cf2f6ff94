"""The synchronous hierarchical round (QAFed Algorithm 1) as three tier programs.

    for each cloud round t:
        plan     = which edges, which clients                     (topology.plan_round)
        for each sampled edge s:
            edge step, κ times:                                   (program.edge)
                device step: local training, upload path, radio   (program.device)
                screen, then the edge rule over its clients' deltas
        cloud step: cloud rule over the edges' results, server step (program.cloud)
        every eval.every rounds: metrics of Q_b(w) for b in eval bits, then a checkpoint

Everything that changes during a run lives in one :class:`RunState` (the global state, the
device-kept state, the upload stages' state, the cost ledger, the attack's state, the
schedule's own state), so a checkpoint is that state and a resumed run continues exactly.
Every stage returns metrics under its own name, each declared with how it reduces between
evaluations (fedtier.metrics: counts sum, norms average); the reduced values are logged with
each evaluation record under "stages".
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedtier.aggregate import ServerStep, client_weights
from fedtier.aggregate.robust import TooFewRows, build_rule
from fedtier.aggregate.rules import Rule
from fedtier.costs.model import CostLedger
from fedtier.evaluate import evaluate_width, width_job
from fedtier.faults import corrupt, dropouts, failed_edges, screen_uploads, upload_faults
from fedtier.local.arm import ArmSetup, Metrics, is_private, map_jobs
from fedtier.metrics import (
    MetricSpec,
    StageValues,
    accumulate,
    declare_stage_metrics,
    reduce_stages,
)
from fedtier.privacy import NoiseKey, dp_mechanism
from fedtier.secure import secure_mean
from fedtier.tasks import ClientTask
from fedtier.topology import RoundPlan, expected_clients, expected_sampled, plan_round
from fedtier.upload import UploadContext

log = logging.getLogger("fedtier")

declare_stage_metrics(
    {
        name: MetricSpec(name.replace("_", " ").capitalize(), reduce="sum")
        for name in ("rejected_honest", "rejected_malicious", "seen_honest", "seen_malicious")
    }
)


@dataclass
class RunState:
    """Everything that changes during one arm's run — what a checkpoint saves.

    ``round`` counts the cloud rounds completed (asynchronous schedules: round-equivalents
    of arrivals); the random streams are keyed by round, edge and client (fedtier.seeding),
    so this state and the configuration determine the rest of the run.
    """

    w: torch.Tensor  # the global state [P]
    round: int = 0
    # each stage metric's values since the last evaluation (fedtier.metrics.accumulate)
    stages: StageValues = field(default_factory=dict)
    device: dict[int, torch.Tensor] = field(default_factory=dict)  # device-kept state (FedBN)
    upload: dict[str, dict[str, Any]] = field(default_factory=dict)  # stateful upload stages
    costs: CostLedger = field(default_factory=CostLedger)  # the cost model's ledger
    attack: dict[str, Any] = field(default_factory=dict)  # the attack's state (observations…)
    schedule: dict[str, Any] = field(default_factory=dict)  # the schedule's own (async queue…)
    # the faults since the last evaluation, one entry per (round, edge) that had any
    # (fedtier.faults); logged with the evaluation record under "faults"
    faults: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (tensors, numbers, dicts) for ``torch.save``."""
        return {
            "w": self.w,
            "round": self.round,
            "stages": {k: list(v) for k, v in self.stages.items()},
            "device": dict(self.device),
            "upload": self.upload,
            "costs": self.costs.to_dict(),
            "attack": self.attack,
            "schedule": self.schedule,
            "faults": list(self.faults),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunState:
        state = cls(w=d["w"], round=d["round"])
        state.stages.update({k: list(v) for k, v in d["stages"].items()})
        state.device.update(d["device"])
        state.upload.update(d["upload"])
        state.costs = CostLedger.from_dict(d["costs"])
        state.attack.update(d["attack"])
        state.schedule.update(d["schedule"])
        state.faults.extend(d.get("faults", []))  # absent in checkpoints before faults
        return state


@dataclass(frozen=True)
class Uploads:
    """What a device step delivers to its edge."""

    deltas: torch.Tensor  # [C, P] as the edge decodes them
    arrived: torch.Tensor  # [C] bool: in time (stragglers past the deadline are dropped)
    finish_s: np.ndarray | None = None  # [C] simulated completion times (None: no cost model)


@dataclass(frozen=True)
class EdgeResult:
    """What an edge sends the cloud after its κ edge rounds."""

    delta: torch.Tensor  # Δ_s = w_edge − w [P]
    weight: float  # its weight at the cloud (0: no update reached the edge)
    score: float | None = None  # an edge step may score itself; the cloud rule may use it


# (setup, state, w, edge, clients, step) → Uploads
DeviceStep = Callable[..., Uploads]
# (setup, state, w, edge, clients, t) → EdgeResult
EdgeStep = Callable[..., EdgeResult]
# (setup, state, w, results, plan, t) → new w
CloudStep = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class TierProgram:
    """What a device, an edge and the cloud do each round; each step is replaceable (an
    edge that trains a generator is another edge step, not a special case in the loop)."""

    device: DeviceStep
    edge: EdgeStep
    cloud: CloudStep


def default_program() -> TierProgram:
    """Today's tiers: devices train, edges screen and aggregate κ times, the cloud applies
    its rule and the server step."""
    return TierProgram(device_step, edge_step, cloud_step)


def program_of(setup: ArmSetup) -> TierProgram:
    return setup.program if setup.program is not None else default_program()


def init_state(setup: ArmSetup) -> RunState:
    """The state before round 0: the model's initial global state, nothing counted yet."""
    return RunState(w=setup.layout.flatten(setup.model))


def bind_state(setup: ArmSetup, state: RunState) -> None:
    """Point the arm's stateful components at ``state`` (the one place their state lives):
    the device-kept states, the cost model's ledger and the attack's observations."""
    setup.local_state = state.device
    if setup.costs is not None:
        setup.costs.ledger = state.costs
    if setup.attack is not None:
        if state.attack:
            setup.attack.load_state_dict(state.attack)
        else:
            state.attack.update(setup.attack.state_dict())


def sync_state(setup: ArmSetup, state: RunState) -> RunState:
    """Gather what the components changed in place into ``state`` (before a checkpoint)."""
    if setup.attack is not None:
        state.attack.clear()
        state.attack.update(setup.attack.state_dict())
    return state


def run_rounds(
    setup: ArmSetup,
    on_eval: Callable[[dict], None],
    on_round: Callable[[int], None] = lambda t: None,
    state: RunState | None = None,
    on_checkpoint: Callable[[RunState], None] | None = None,
) -> torch.Tensor:
    """Train until cfg.train.rounds cloud rounds are done; returns the final global state [P].

    ``state`` resumes a run (from a checkpoint); ``on_checkpoint`` receives the state after
    every evaluation (the run directory saves it)."""
    cfg = setup.cfg
    state = state if state is not None else init_state(setup)
    bind_state(setup, state)
    program = program_of(setup)
    while state.round < cfg.train.rounds:
        t = state.round
        plan = plan_round(setup.topology, cfg.topology, cfg.seed, t, poisson=is_private(cfg))
        failed = failed_edges(cfg.faults, cfg.seed, t, list(plan.edges))
        results = [
            program.edge(setup, state, state.w, edge, clients, t)
            if edge not in failed
            else failed_edge(state, state.w, edge, t)
            for edge, clients in plan.edges.items()
        ]
        state.w = program.cloud(setup, state, state.w, results, plan, t)
        state.round = t + 1
        done = out_of_time(setup)
        if state.round % cfg.eval.every == 0 or state.round == cfg.train.rounds or done:
            record = {
                "round": state.round,
                "plan": plan.to_dict(),
                "stages": reduce_stages(state.stages),
                "bits": evaluate(setup, state.w),
            }
            if state.faults:
                record["faults"] = list(state.faults)
            if setup.costs is not None:
                record["costs"] = setup.costs.snapshot()
            on_eval(record)
            state.stages.clear()
            state.faults.clear()
            if on_checkpoint is not None:
                on_checkpoint(sync_state(setup, state))
        on_round(t)
        if done:
            break
    return state.w


def cloud_step(
    setup: ArmSetup,
    state: RunState,
    w: torch.Tensor,
    results: list[EdgeResult],
    plan: RoundPlan,
    t: int,
) -> torch.Tensor:
    """The cloud rule over the edges that reached it, then the server step and the
    post-step defenses (global clipping, server noise)."""
    if setup.costs is not None:
        setup.costs.cloud_round(len(results))
    live = [r for r in results if r.weight > 0]  # all may miss the deadline, fail…
    if not live:  # keep the model; the round is recorded
        _add(state.stages, "cloud/faults", {"no_update_rounds": 1.0})
        state.faults.append({"round": t, "no_update": True})
        return w
    a = setup.cfg.aggregate
    cloud_rule = build_rule(a.cloud_rule.name, a.cloud_rule.options(), "aggregate.cloud_rule")
    try:
        mean_update, m, _ = cloud_rule(
            torch.stack([r.delta for r in live]), torch.tensor([cloud_weight(r) for r in live])
        )
    except TooFewRows:
        if len(live) == len(results):  # the configured sample itself is too small
            raise
        _add(state.stages, "cloud/faults", {"too_few_rows": 1.0, "no_update_rounds": 1.0})
        state.faults.append({"round": t, "no_update": True, "too_few_rows": 1})
        return w
    _add(state.stages, "cloud", m)
    step = ServerStep(a.rule, server_lr(setup), setup.topology.num_clients)
    w = step.apply(w, mean_update, sampled_count(setup, plan))
    if setup.post_step is not None:
        w, m = setup.post_step(w, t)
        _add(state.stages, "server", m)
    return w


def cloud_weight(result: EdgeResult) -> float:
    """An edge's weight in the cloud rule: its weight (clients' samples, or counts), times
    its score when its edge step reports one (an edge that trains, e.g. a GAN's community
    generator, scores itself; the cloud weights edges by those scores)."""
    return result.weight if result.score is None else result.weight * result.score


def central_dp_rows(setup: ArmSetup, edge: int) -> int | None:
    """Under central DP, the fixed denominator q N_e of ``edge``'s noisy sum (DP-FedAvg's
    estimator, :mod:`fedtier.privacy`), which is also the edge's weight at the cloud; else
    None (the realised rows and their weights)."""
    mech = dp_mechanism(setup.cfg)
    if mech is None or mech[0] != "central":
        return None
    return expected_clients(setup.topology, setup.cfg.topology, edge)


def sampled_count(setup: ArmSetup, plan: RoundPlan) -> int:
    """The m of the server step: the clients sampled, or under central DP their expected
    number (a count that does not depend on who was sampled)."""
    rows = [central_dp_rows(setup, e) for e in plan.edges]
    if any(r is None for r in rows):
        return len(plan.clients)
    return sum(r for r in rows if r is not None)


def edge_rule(setup: ArmSetup, t: int, edge: int, k: int) -> Rule:
    """The edge rule of edge round k of cloud round t at ``edge``; a noisy rule (dp-mean)
    draws fresh noise for each (t, edge, k)."""
    a = setup.cfg.aggregate
    key = NoiseKey(setup.cfg.seed, t, edge, k, central_dp_rows(setup, edge))
    return build_rule(a.edge_rule.name, a.edge_rule.options(), "aggregate.edge_rule", key)


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


def edge_step(
    setup: ArmSetup, state: RunState, w: torch.Tensor, edge: int, clients: list[int], t: int
) -> EdgeResult:
    """κ edge rounds from w: each a device step of the edge's clients, the validation screen
    (fedtier.faults), the screen (qcheck) and the edge rule over the uploads that arrived and
    passed; returns (Δ_s [P], the edge's cloud weight). Sampled clients that drop out
    (``faults.dropout``) take no part in the round; every fault is counted under
    ``edge/faults/…`` and listed per (round, edge) in ``state.faults``."""
    cfg = setup.cfg
    kappa = cfg.aggregate.edge_rounds
    counts: dict[str, float] = {}
    gone = dropouts(cfg.faults, cfg.seed, t, edge, clients)
    if any(gone):
        counts["dropped_out"] = float(sum(gone))
        _add(state.stages, "edge/faults", {"dropped_out": counts["dropped_out"]})
        clients = [c for c, g in zip(clients, gone) if not g]
    dp_rows = central_dp_rows(setup, edge)
    if not clients:  # an empty Poisson sample (DP arms), or every client dropped out
        _record_faults(state, t, edge, counts)
        return empty_edge(setup, state, w, edge, t)
    w_edge, reached = w, False
    if setup.costs is not None:
        clients = setup.costs.schedule(clients)
    sizes = torch.tensor([float(setup.topology.num_samples[c]) for c in clients])
    weights = client_weights(cfg.aggregate.rule, sizes)
    program = program_of(setup)
    for k in range(kappa):
        step = t * kappa + k
        rule = edge_rule(setup, t, edge, k)
        sent = program.device(setup, state, w_edge, edge, clients, step)
        deltas, keep = validate(setup, state, sent, clients, step, counts)
        if setup.screen is not None and keep.any():
            seen = clients if bool(keep.all()) else [c for c, f in zip(clients, keep.tolist()) if f]
            ctx = upload_context(setup, state, edge, seen, step)
            rows = deltas if bool(keep.all()) else deltas[keep]
            screened, m = setup.screen(setup, w_edge, rows, ctx)
            keep[keep.clone()] = screened
            _add(state.stages, "screen", attribute(m, screened, seen, setup.malicious))
        if cfg.aggregate.secure is not None:  # the edge sees only the masked uploads' sum
            mean = secure_edge_round(setup, state, deltas, weights, keep, clients, (t, edge, k))
            if mean is not None:
                w_edge, reached = w_edge + mean, True
            continue
        if not keep.any() and dp_rows is None:  # central DP releases noise even then
            continue
        try:
            if bool(keep.all()):  # no row dropped: aggregate without copying the block
                kept = clients
                mean, m, selected = rule(deltas, weights)
            else:
                kept = [c for c, flag in zip(clients, keep.tolist()) if flag]
                mean, m, selected = rule(deltas[keep], weights[keep])
        except TooFewRows:
            if bool(keep.all()) and not any(gone):  # the configured sample is too small
                raise
            counts["too_few_rows"] = counts.get("too_few_rows", 0.0) + 1
            _add(state.stages, "edge/faults", {"too_few_rows": 1.0})
            continue
        _add(state.stages, "edge", attribute(m, selected, kept, setup.malicious))
        w_edge = w_edge + mean
        reached = True
    _record_faults(state, t, edge, counts)
    if dp_rows is not None:
        return EdgeResult(w_edge - w, float(dp_rows))
    return EdgeResult(w_edge - w, float(weights.sum()) if reached else 0.0)


def secure_edge_round(
    setup: ArmSetup,
    state: RunState,
    deltas: torch.Tensor,
    weights: torch.Tensor,
    arrived: torch.Tensor,
    clients: list[int],
    key: tuple[int, int, int],
) -> torch.Tensor | None:
    """The edge rule's weighted mean [P] of the uploads that arrived, by secure aggregation
    (:func:`fedtier.secure.secure_mean`); None when the protocol aborts (fewer than t
    survivors: the edge round adds nothing, logged as ``edge/secagg/aborted``). Its
    per-phase bytes go to the cost ledger."""
    spec = setup.cfg.aggregate.secure
    assert spec is not None
    t, edge, k = key
    sec = secure_mean(
        deltas, weights, arrived, setup.upload_mask, spec, (setup.cfg.seed, t, edge, k), clients
    )
    _add(state.stages, f"edge/{spec.name}", sec.metrics)
    if setup.costs is not None:
        setup.costs.totals[f"{spec.name}_aborted"] += sec.metrics["aborted"]
        if sec.outcome is not None:
            costs = sec.outcome.costs
            setup.costs.protocol_bytes(
                spec.name,
                {p: float(c.up.sum()) for p, c in costs.items()},
                {p: float(c.down.sum()) for p, c in costs.items()},
            )
    if sec.metrics.get("clipped_coords"):
        log.warning(
            "round %d, edge %d: secure aggregation clipped %d weighted coordinates to ±%g "
            "(raise aggregate.secure.clip_range)",
            t + 1,
            edge,
            sec.metrics["clipped_coords"],
            spec.clip_range,
        )
    if sec.mean is None:
        log.warning(
            "round %d, edge %d, edge round %d: secure aggregation aborted (%s)",
            t + 1,
            edge,
            k + 1,
            sec.outcome.aborted if sec.outcome is not None else "fewer than two clients",
        )
    return sec.mean


def validate(
    setup: ArmSetup,
    state: RunState,
    sent: Uploads,
    clients: list[int],
    step: int,
    counts: dict[str, float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The uploads as the edge receives them (with the injected upload faults), through the
    validation screen (fedtier.faults.screen_uploads): (the block [C, P] with rejected rows
    zero, which rows arrived in time and passed [C] bool). Adds each cause's count to
    ``counts`` and to the stage metrics ``edge/faults/…`` (stragglers as ``late``)."""
    f = setup.cfg.faults
    injected = upload_faults(f, setup.cfg.seed, step, clients)
    received = corrupt(sent.deltas, injected, f.absurd_norm) if any(injected) else sent.deltas
    deltas, ok, m = screen_uploads(received, state.w.numel(), f.max_norm)
    if sent.finish_s is not None:
        m["late"] = float((~sent.arrived).sum())
    _add(state.stages, "edge/faults", m)
    for name, v in m.items():
        if v:
            counts[name] = counts.get(name, 0.0) + v
    return deltas, sent.arrived & ok


def failed_edge(state: RunState, w: torch.Tensor, edge: int, t: int) -> EdgeResult:
    """What a failed edge sends the cloud: nothing (weight 0, also under central DP: it
    releases nothing); counted as ``cloud/faults/failed_edges``."""
    _add(state.stages, "cloud/faults", {"failed_edges": 1.0})
    _record_faults(state, t, edge, {"failed": 1.0})
    return EdgeResult(torch.zeros_like(w), 0.0)


def _record_faults(state: RunState, t: int, edge: int, counts: dict[str, float]) -> None:
    if counts:
        state.faults.append({"round": t, "edge": edge, **{k: int(v) for k, v in counts.items()}})


def empty_edge(setup: ArmSetup, state: RunState, w: torch.Tensor, edge: int, t: int) -> EdgeResult:
    """An edge that sampled no client trains no one and sends nothing (weight 0), except
    under central DP: its κ releases are noise over the fixed denominator, as for any sample
    (add/remove adjacency: an empty edge must look like one whose client was sampled)."""
    dp_rows = central_dp_rows(setup, edge)
    if dp_rows is None:
        return EdgeResult(torch.zeros_like(w), 0.0)
    none = torch.zeros(0, w.numel(), dtype=w.dtype)
    update = torch.zeros_like(w)
    for k in range(setup.cfg.aggregate.edge_rounds):
        mean, m, _ = edge_rule(setup, t, edge, k)(none, torch.zeros(0))
        _add(state.stages, "edge", m)
        update += mean
    return EdgeResult(update, float(dp_rows))


def device_step(
    setup: ArmSetup, state: RunState, w: torch.Tensor, edge: int, clients: list[int], step: int
) -> Uploads:
    """The devices' part of one edge round: local training from w (the executor), the upload
    path (attacks, clipping, noise, codecs) and the radio's cost. Returns the uploads [C, P]
    as the edge decodes them and which arrive in time [C]."""
    assert setup.executor is not None
    deltas = setup.executor(setup, w, clients, step)
    return upload(setup, state, deltas, edge, clients, step)


def upload(
    setup: ArmSetup,
    state: RunState,
    deltas: torch.Tensor,
    edge: int,
    clients: list[int],
    step: int,
) -> Uploads:
    """Send trained deltas [C, P] up the upload path and price them on the radio."""
    ctx = upload_context(setup, state, edge, clients, step)
    deltas, m = setup.upload(deltas, ctx)
    _add(state.stages, "client", m)
    if setup.costs is None:
        return Uploads(deltas, torch.ones(len(clients), dtype=torch.bool))
    uploaded = int(setup.upload_mask.sum())
    cost = setup.costs.edge_round(edge, clients, ctx.payload_bytes, uploaded)
    return Uploads(deltas, torch.from_numpy(cost.kept), cost.finish_s)


def upload_context(
    setup: ArmSetup, state: RunState, edge: int, clients: list[int], step: int
) -> UploadContext:
    sizes = torch.tensor([float(setup.topology.num_samples[c]) for c in clients])
    return UploadContext(
        step, edge, clients, sizes, setup.cfg.seed, radio=setup.costs, states=state.upload
    )


def evaluated_state(setup: ArmSetup, w: torch.Tensor) -> torch.Tensor:
    """The state [P] that is evaluated and deployed: w, and for FedBN's device-kept entries
    the mean of the devices' states."""
    if not setup.local_state:
        return w
    kept = torch.stack(list(setup.local_state.values())).mean(0)
    return torch.where(setup.upload_mask, w, kept)


def evaluate(setup: ArmSetup, w: torch.Tensor) -> dict[str, Metrics]:
    """Metrics per evaluation bit width of :func:`evaluated_state`, the widths side by side
    in the executor's workers when it has them (:func:`fedtier.local.arm.map_jobs`)."""
    cfg = setup.cfg
    state, bits = evaluated_state(setup, w), cfg.quant.eval_bits
    jobs = [width_job(state, setup.test, b, setup.spec, cfg.eval.batch_size) for b in bits]
    return {str(b): m for b, m in zip(bits, map_jobs(setup, evaluate_width, jobs))}


def headline(task: ClientTask, metrics: Metrics) -> float:
    """The task's headline metric in ``metrics`` (NaN when it was not measured)."""
    return float(metrics.get(task.headline, float("nan")))


def attribute(
    metrics: Metrics, kept: torch.Tensor | None, clients: list[int], malicious: frozenset[int]
) -> Metrics:
    """``metrics`` plus, when a rule or screen selected rows (``kept`` [C] bool over the rows
    of ``clients``; None: it selects none), the counts of rejected and seen honest and
    malicious updates."""
    out = dict(metrics)
    if kept is not None:
        if kept.shape != (len(clients),):
            raise ValueError(f"kept mask {tuple(kept.shape)} for {len(clients)} rows")
        rejected = [c for c, k in zip(clients, kept.tolist()) if not k]
        out["rejected_malicious"] = float(sum(c in malicious for c in rejected))
        out["rejected_honest"] = float(len(rejected) - out["rejected_malicious"])
        out["seen_malicious"] = float(sum(c in malicious for c in clients))
        out["seen_honest"] = float(len(clients) - out["seen_malicious"])
    return out


def _add(values: StageValues, tier: str, metrics: Metrics) -> None:
    accumulate(values, tier, metrics)
