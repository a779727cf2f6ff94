"""Seed 001's three-tier GAN: device discriminators, edge generators, a cloud generator.

Region k (edge k) has devices j ∈ J_k, each with its own discriminator D_kj (it never leaves
the device), and the edge's community generator G_k; the cloud holds the global G.

Local phase — I_lo iterations of region k, iteration s (counted per region):

1. the edge draws z_d, z_g [B, z_dim] from the stream (seed, "gan-z", k, s) and sends the
   samples G_k(z_d) and G_k(z_g) to its devices (fp32: 2 · B · C·H·W · 4 bytes per device);
2. device j draws a real batch [B] from (seed, "gan-batch", j, s) and takes one Adam step on
   −(E log D_kj(x) + E log(1 − D_kj(G_k(z_d))));
3. device j returns its feedback: the gradient with respect to the samples G_k(z_g) of the
   generator's loss on its updated D_kj (``gan.generator_loss``: non-saturating
   −E log D(G(z_g)) or the seed's minimax E log(1 − D(G(z_g)))) — [B, C, H, W] through the
   upload chain (``upload``: the codecs encode it and count its bytes) — and its fooling loss
   L_{D_kj}(G_k) = E log(1 − D_kj(G_k(z_g))), one number;
4. the edge backpropagates the mean of the feedback that arrived through G_k(z_g) and takes
   one Adam step of G_k (one generator update). The devices' discriminators of all regions
   are trained together (:class:`fedtier.gan.devices.DeviceDiscriminators`).

Global phase: each region uploads G_k − G_start through the upload chain (the codecs apply);
the cloud forms G = Σ_k w_k Ĝ_k with w = :func:`fedtier.gan.weights.region_weights` of the
regions' L̄_k (mean over its devices and the phase's iterations), sends G back (fp32) and
every G_k restarts from it (``gan.aggregate: parameters``; ``mixture`` instead keeps the
Ĝ_k and samples component k with probability w_k, the edges continuing from their own G_k).

* ``gan.update: sync`` — every global step all regions run a local phase from G; it lasts as
  long as the slowest region (the cost model's clock: each iteration as long as the region's
  slowest device computing 3B sample passes and uploading its feedback).
* ``gan.update: async`` — each region runs phases back to back on its own clock; when one
  reports (events in time order, ties by region), the cloud updates G from every region's last
  report with weights damped by age (:mod:`fedtier.gan.weights`), and that region restarts from
  the new G. A region's phase is computed when it starts, its costs are booked when it reports.

The run stops after I_gl global steps (async: I_gl · K reports) or at
``schedule.time_budget_s`` of simulated time (sync: after the step that reaches it; async:
reports after the budget are not applied). The Adam states of G_k stay on the edge across
global steps (documented choice); the discriminators and their Adam states stay on the
devices for the whole run. Downlinks (samples, the global G) are fp32; the codecs act on the
uplinks. Samples for evaluation come from G in eval mode (BatchNorm's running statistics,
averaged with the rest of the state). Everything runs on the CPU (``train.device`` is not
used by this arm).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from fedtier.config import Config
from fedtier.costs.model import CostLedger, CostModel
from fedtier.errors import ConfigError, FedtierError
from fedtier.gan.devices import DeviceDiscriminators, check_discriminator
from fedtier.gan.weights import region_weights
from fedtier.local.precision import resolve_precision
from fedtier.metrics import (
    MetricSpec,
    StageValues,
    accumulate,
    declare_stage_metrics,
    reduce_stages,
)
from fedtier.models import build_model
from fedtier.seeding import derive_seed, torch_generator
from fedtier.state import StateLayout
from fedtier.topology import Topology, build_topology
from fedtier.upload import Chain, UploadContext, build_chain

declare_stage_metrics(
    {
        "d_loss": MetricSpec("Discriminator loss", reduce="mean"),
        "fooling_loss": MetricSpec("Fooling loss E log(1 − D(G(z)))", reduce="mean"),
    }
)

# upload stages that apply to the GAN's feedback and generator uploads
GAN_STAGES = ("clip", "fp32", "quantize", "qsgd", "terngrad", "signsgd", "topk", "dynamic")
SAMPLE_CHUNK = 1000  # generated images per forward pass when sampling

Sampler = Callable[[int, int], torch.Tensor]  # (n, seed) → images [n, C, H, W] in [-1, 1]


def check_three_tier(cfg: Config) -> None:
    """Refuse settings that cannot apply to the three-tier GAN, naming both sides."""
    what = "the three-tier GAN (gan)"
    a = cfg.aggregate
    for tier in ("edge_rule", "cloud_rule"):
        rule = getattr(a, tier)
        if rule.name != "mean":
            raise ConfigError(
                f"aggregate.{tier}",
                rule.name,
                f"'mean' for {what}: its edges combine their devices' feedback on generated "
                "samples and its cloud weights the community generators by the softmax of "
                "gan.score; a rule over client model updates cannot apply",
            )
    if a.edge_rounds != 1:
        raise ConfigError(
            "aggregate.edge_rounds", a.edge_rounds, f"1 for {what} (its local phase is gan.i_lo)"
        )
    if cfg.attack.kind != "none":
        raise ConfigError(
            "attack.kind",
            cfg.attack.kind,
            f"'none' for {what}: attack '{cfg.attack.kind}' manipulates a classifier's model "
            "updates; the GAN's devices send feedback on generated samples",
        )
    if cfg.defenses:
        raise ConfigError(
            "defenses[0].name",
            cfg.defenses[0].name,
            f"no defenses for {what}: '{cfg.defenses[0].name}' screens or steps a "
            "classifier's global model",
        )
    if cfg.quant.qat:
        raise ConfigError("quant.qat", True, f"false for {what} (QAT trains classifiers)")
    for i, spec in enumerate(cfg.upload):
        if spec.name not in GAN_STAGES:
            raise ConfigError(
                f"upload[{i}].name",
                spec.name,
                f"one of {list(GAN_STAGES)} for {what}: stage '{spec.name}' is accounted per "
                "synchronous round of sampled clients' model updates, not for feedback",
            )
    if cfg.schedule.name != "sync":
        raise ConfigError(
            "schedule.name",
            cfg.schedule.name,
            f"'sync' for {what}; its asynchronous global phase is gan.update: async",
        )


@dataclass
class ThreeTierSetup:
    """Everything fixed for one three-tier run, plus the working modules."""

    cfg: Config
    data: list[torch.Tensor]  # device n → its images [n_n, C, H, W] in [-1, 1]
    blocks: list[slice]  # region k → its devices' rows (device ids are rows, region order)
    topology: Topology
    costs: CostModel
    upload: Chain  # feedback (device → edge) and generator uploads (edge → cloud)
    generators: list[nn.Module]  # G_k, the edges' working modules
    optimizers: list[torch.optim.Adam]  # G_k's Adam (edge-kept)
    layout: StateLayout  # the generator's float state [P_G]
    discriminators: DeviceDiscriminators
    sampler_model: nn.Module  # a generator module to sample from (eval mode)
    edge_seed: int  # seed of the edges' upload codecs (its own stream family)

    @property
    def regions(self) -> int:
        return len(self.blocks)

    def devices(self, k: int) -> list[int]:
        return list(range(self.blocks[k].start, self.blocks[k].stop))


@dataclass
class GanState:
    """Everything that changes during a three-tier run (what a checkpoint saves)."""

    g: torch.Tensor  # the global generator [P_G]
    start: torch.Tensor  # [K, P_G] the G each region's current phase started from
    reported: torch.Tensor  # [K, P_G] the cloud's last decoded Ĝ_k
    losses: list[float]  # [K] the regions' last reported L̄_k (nan: never)
    versions: list[int]  # [K] cloud version of each region's last report (−1: never)
    weights: list[float]  # [K] the cloud's last weights
    steps: list[int]  # [K] local iterations done per region (keys the random streams)
    phases: list[int]  # [K] local phases done per region
    phase_loss: list[list[float]]  # [K] the current phase's per-iteration L̄ values
    phase_updates: list[int]  # [K] generator steps of the current phase (feedback arrived)
    version: int = 0  # cloud updates applied (global steps)
    generator_updates: int = 0  # G_k Adam steps whose phase reached the cloud
    pending: list[dict[str, Any]] = field(default_factory=list)  # async: computed phases
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per cloud update
    stages: StageValues = field(default_factory=dict)
    costs: CostLedger = field(default_factory=CostLedger)
    upload: dict[str, dict[str, Any]] = field(default_factory=dict)  # device chain state
    edge_upload: dict[str, dict[str, Any]] = field(default_factory=dict)  # edge chain state
    edges: dict[str, Any] = field(default_factory=dict)  # G_k modules and Adam (captured)
    devices: dict[str, Any] = field(default_factory=dict)  # the discriminators (captured)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["costs"] = self.costs.to_dict()
        d["stages"] = {k: list(v) for k, v in self.stages.items()}
        return copy.deepcopy(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GanState:
        d = copy.deepcopy(d)
        ledger = CostLedger.from_dict(d.pop("costs"))
        state = cls(**d)
        state.costs = ledger
        return state


@dataclass
class ThreeTierResult:
    """What :func:`run_three_tier` returns."""

    generator: nn.Module | None  # the global G (eval mode); None for a mixture
    sample: Sampler  # (n, seed) → n images of the global generator (or mixture)
    history: list[dict[str, Any]]  # per cloud update: step, time_s, region, weights, losses, ages
    bytes: dict[str, float]  # per tier and direction (see :func:`tier_bytes`)
    time_s: float  # simulated time
    wall_s: float  # wall-clock time of the run
    generator_updates: int  # generator Adam steps of the phases that reached the cloud
    global_steps: int  # cloud updates
    costs: dict[str, Any]  # the cost model's snapshot (energy, rounds…)
    state: GanState


# ------------------------------------------------------------------------------------- setup


def prepare_three_tier(cfg: Config, regions: Sequence[Sequence[torch.Tensor]]) -> ThreeTierSetup:
    """Check the settings and the data (region k → device j → images [n, C, H, W] in [-1, 1])
    and build the models, the topology (devices numbered region by region) and the costs."""
    check_three_tier(cfg)
    g = cfg.gan
    if len(regions) != cfg.topology.edges:
        raise ConfigError(
            "topology.edges", cfg.topology.edges, f"{len(regions)}, the number of data regions"
        )
    data: list[torch.Tensor] = []
    blocks: list[slice] = []
    for k, devices in enumerate(regions):
        if len(devices) == 0:
            raise ConfigError(f"regions[{k}]", [], "a region with at least one device")
        blocks.append(slice(len(data), len(data) + len(devices)))
        for j, x in enumerate(devices):
            if x.dim() != 4 or len(x) == 0:
                raise ConfigError(
                    f"regions[{k}][{j}]", tuple(x.shape), "a non-empty image batch [n, C, H, W]"
                )
            data.append(x.float())
    shape = tuple(data[0].shape[1:])
    for n, x in enumerate(data):
        if tuple(x.shape[1:]) != shape:
            raise ConfigError("regions", tuple(x.shape[1:]), f"every device's images {shape}")
        if float(x.abs().max()) > 1 + 1e-3:
            raise FedtierError(
                f"the GAN's real images must lie in [-1, 1] (the generator's tanh range); "
                f"device {n} has values up to {float(x.abs().max()):.3g} "
                "(map a standardised data set with fedtier.generative.to_pm1)"
            )
    if cfg.topology.clients != len(data):
        raise ConfigError(
            "topology.clients", cfg.topology.clients, f"{len(data)}, the devices of the regions"
        )
    edge_of = np.repeat(np.arange(len(blocks)), [b.stop - b.start for b in blocks])
    b = g.batch_size
    numel = int(np.prod(shape))
    # cost model: per local iteration a device makes 3B sample passes (B real + B fake for its
    # update, B fake for the feedback); its downlink is the 2B generated samples
    topology = build_topology(cfg.topology, np.full(len(data), 3 * b), cfg.seed, edge_of)
    costs = CostModel(cfg.costs, topology, 1, 2 * b * numel)
    image_shape = (int(shape[0]), int(shape[1]), int(shape[2]))
    if "z_dim" in g.generator.options:
        raise ConfigError(
            "gan.generator.options.z_dim", g.generator.options["z_dim"], "unset; set gan.z_dim"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "gan-init-g"))
        g0 = build_model(g.generator.name, image_shape, 1, z_dim=g.z_dim, **g.generator.options)
        ds = []
        for n in range(len(data)):
            torch.manual_seed(derive_seed(cfg.seed, "gan-init-d", n))
            ds.append(build_model(g.discriminator.name, image_shape, 1, **g.discriminator.options))
    check_discriminator(ds[0], g.discriminator.name)
    betas = (g.beta1, g.beta2)
    generators = [copy.deepcopy(g0).train() for _ in blocks]
    return ThreeTierSetup(
        cfg=cfg,
        data=data,
        blocks=blocks,
        topology=topology,
        costs=costs,
        upload=build_chain(cfg.upload),
        generators=generators,
        optimizers=[torch.optim.Adam(m.parameters(), lr=g.lr_g, betas=betas) for m in generators],
        layout=StateLayout.of(g0),
        discriminators=DeviceDiscriminators.stack(
            ds, g.lr_d, betas, g.executor, resolve_precision(cfg.train.precision)
        ),
        sampler_model=copy.deepcopy(g0).eval(),
        edge_seed=derive_seed(cfg.seed, "gan-edge-upload"),
    )


def init_state(setup: ThreeTierSetup) -> GanState:
    k = setup.regions
    g = setup.layout.flatten(setup.generators[0])
    return GanState(
        g=g,
        start=g.expand(k, -1).clone(),
        reported=g.expand(k, -1).clone(),
        losses=[float("nan")] * k,
        versions=[-1] * k,
        weights=[1.0 / k] * k,
        steps=[0] * k,
        phases=[0] * k,
        phase_loss=[[] for _ in range(k)],
        phase_updates=[0] * k,
    )


def capture(setup: ThreeTierSetup, state: GanState) -> GanState:
    """Copy the working modules' state (G_k, their Adam, the discriminators) into ``state``."""
    state.edges = copy.deepcopy(
        {
            "generators": [setup.layout.flatten(m) for m in setup.generators],
            "optimizers": [o.state_dict() for o in setup.optimizers],
        }
    )
    state.devices = copy.deepcopy(setup.discriminators.state_dict())
    state.costs = setup.costs.ledger
    return state


def restore(setup: ThreeTierSetup, state: GanState) -> None:
    """Load a captured ``state`` into the working modules (resume)."""
    setup.costs.ledger = state.costs
    if not state.edges:
        return
    for m, flat in zip(setup.generators, state.edges["generators"]):
        setup.layout.load(m, flat)
    for o, sd in zip(setup.optimizers, state.edges["optimizers"]):
        o.load_state_dict(copy.deepcopy(sd))
    setup.discriminators.load_state_dict(state.devices)


# ------------------------------------------------------------------------------- local phase


def real_batch(setup: ThreeTierSetup, device: int, step: int) -> torch.Tensor:
    """Device ``device``'s real batch [B, C, H, W] at its region's iteration ``step``: B
    distinct samples (all of them in random order, with repeats, if it holds fewer than B)."""
    x, b = setup.data[device], setup.cfg.gan.batch_size
    gen = torch_generator(setup.cfg.seed, "gan-batch", device, step)
    if len(x) >= b:
        idx = torch.randperm(len(x), generator=gen)[:b]
    else:
        idx = torch.randint(len(x), (b,), generator=gen)
    return x[idx]


def local_iteration(setup: ThreeTierSetup, state: GanState, regions: list[int]) -> None:
    """One local iteration of ``regions`` (consecutive region ids; their devices' rows form
    one block, so all their discriminators step in one call)."""
    cfg, g = setup.cfg, setup.cfg.gan
    samples: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for k in regions:
        z = torch.randn(
            2,
            g.batch_size,
            g.z_dim,
            generator=torch_generator(cfg.seed, "gan-z", k, state.steps[k]),
        )
        gen = setup.generators[k]
        with torch.no_grad():
            fake_d = gen(z[0])
        samples[k] = (fake_d, gen(z[1]))
    block = slice(setup.blocks[regions[0]].start, setup.blocks[regions[-1]].stop)
    real = torch.stack(
        [real_batch(setup, n, state.steps[k]) for k in regions for n in setup.devices(k)]
    )

    def per_device(which: int) -> torch.Tensor:
        parts = []
        for k in regions:
            x = samples[k][which].detach()
            parts.append(x.expand(len(setup.devices(k)), *x.shape))
        return torch.cat(parts)

    d_losses = setup.discriminators.step(block, real, per_device(0))
    feedback, fooling = setup.discriminators.feedback(block, per_device(1), g.generator_loss)
    for k in regions:
        rows = slice(setup.blocks[k].start - block.start, setup.blocks[k].stop - block.start)
        sent, kept = send_feedback(setup, state, k, feedback[rows].flatten(1))
        fake_g = samples[k][1]
        if bool(kept.any()):
            opt = setup.optimizers[k]
            opt.zero_grad(set_to_none=True)
            fake_g.backward(sent[kept].mean(0).view_as(fake_g))
            opt.step()
            state.phase_updates[k] += 1
        accumulate(
            state.stages,
            "device",
            {"d_loss": float(d_losses[rows].mean()), "fooling_loss": float(fooling[rows].mean())},
        )
        state.phase_loss[k].append(float(fooling[rows].mean()))
        state.steps[k] += 1


def send_feedback(
    setup: ThreeTierSetup, state: GanState, k: int, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Region k's devices' feedback rows [J, B·C·H·W] through the upload chain (as the edge
    decodes them) and the radio (which rows arrive in time [J] bool)."""
    devices = setup.devices(k)
    ctx = UploadContext(
        state.steps[k],
        k,
        devices,
        torch.ones(len(devices)),
        setup.cfg.seed,
        radio=setup.costs,
        states=state.upload,
    )
    sent, m = setup.upload(rows, ctx)
    accumulate(state.stages, "device", m)
    cost = setup.costs.edge_round(k, devices, ctx.payload_bytes, rows.shape[1])
    return sent, torch.from_numpy(cost.kept)


def upload_generator(setup: ThreeTierSetup, state: GanState, k: int) -> tuple[torch.Tensor, int]:
    """End of region k's phase: G_k − G_start through the upload chain; returns the cloud's
    decoded Ĝ_k [P_G] and the bytes sent."""
    delta = setup.layout.flatten(setup.generators[k]) - state.start[k]
    ctx = UploadContext(
        state.phases[k], k, [k], torch.ones(1), setup.edge_seed, states=state.edge_upload
    )
    decoded, m = setup.upload(delta[None], ctx)
    accumulate(state.stages, "edge", m)
    state.phases[k] += 1
    return state.start[k] + decoded[0], ctx.payload_bytes.get(k, 4 * delta.numel())


def end_phase(state: GanState, k: int) -> tuple[float, int]:
    """L̄_k of the phase just finished (mean over its iterations of the devices' mean) and
    its generator updates (iterations in which some feedback arrived)."""
    values, updates = state.phase_loss[k], state.phase_updates[k]
    state.phase_loss[k], state.phase_updates[k] = [], 0
    return float(np.mean(values)), updates


# ------------------------------------------------------------------------------ global phase


def restart(setup: ThreeTierSetup, state: GanState, k: int) -> None:
    """Region k starts its next phase from the global G (parameter aggregation only)."""
    if setup.cfg.gan.aggregate == "parameters":
        setup.layout.load(setup.generators[k], state.g)
        state.start[k] = state.g
    else:
        state.start[k] = setup.layout.flatten(setup.generators[k])


def cloud_update(setup: ThreeTierSetup, state: GanState, ages: np.ndarray | None) -> np.ndarray:
    """G from the regions' last reports (parameter space) with the weights of their scores."""
    g = setup.cfg.gan
    reported = np.array(state.versions) >= 0
    w = region_weights(
        np.nan_to_num(np.array(state.losses)), g.temperature, g.score, ages, g.alpha, reported
    )
    state.weights = [float(x) for x in w]
    if g.aggregate == "parameters":
        state.g = (torch.from_numpy(w).float()[:, None] * state.reported).sum(0)
    return w


def reported_losses(state: GanState) -> list[float | None]:
    """The regions' last L̄_k (None: not reported yet), as logged."""
    return [None if v < 0 else x for x, v in zip(state.losses, state.versions)]


def _record(state: GanState, now: float, region: int | None, ages: np.ndarray) -> None:
    state.history.append(
        {
            "step": state.version,
            "time_s": round(float(now), 6),
            "region": region,
            "weights": list(state.weights),
            "losses": reported_losses(state),
            "ages": [int(a) for a in ages],
        }
    )


def run_sync(setup: ThreeTierSetup, state: GanState, tick: Callable[[], bool]) -> None:
    """Synchronous global phases until I_gl steps or the time budget."""
    cfg = setup.cfg
    k_all = list(range(setup.regions))
    budget = cfg.schedule.time_budget_s
    while state.version < cfg.gan.i_gl:
        for k in k_all:
            restart(setup, state, k)
        for _ in range(cfg.gan.i_lo):
            local_iteration(setup, state, k_all)
        up = 0
        for k in k_all:
            state.reported[k], sent = upload_generator(setup, state, k)
            state.losses[k], updates = end_phase(state, k)
            state.generator_updates += updates
            up += sent
        state.version += 1
        state.versions = [state.version] * setup.regions
        cloud_update(setup, state, None)
        down = 4 * state.g.numel() * setup.regions if cfg.gan.aggregate == "parameters" else 0
        setup.costs.cloud_round(setup.regions, up_bytes=up, down_bytes=down)
        now = setup.costs.totals["time_s"]
        _record(state, now, None, np.zeros(setup.regions))
        if tick() or (budget is not None and now >= budget):
            break
    for k in k_all:  # the edges hold the final G, as after every global step
        restart(setup, state, k)


def launch(setup: ThreeTierSetup, state: GanState, k: int, now: float) -> None:
    """Async: region k runs its next phase from ``now``; its report is queued at the end
    (its costs are kept aside until then)."""
    real = setup.costs.ledger
    setup.costs.ledger = scratch = CostLedger()
    try:
        for _ in range(setup.cfg.gan.i_lo):
            local_iteration(setup, state, [k])
    finally:
        setup.costs.ledger = real
    g_k, sent = upload_generator(setup, state, k)
    loss, updates = end_phase(state, k)
    state.pending.append(
        {
            "time": now + float(scratch.edge_time.get(k, 0.0)),
            "region": k,
            "g": g_k,
            "loss": loss,
            "updates": updates,
            "bytes": sent,
            "totals": dict(scratch.totals),
            "client_bytes": dict(scratch.client_bytes),
        }
    )


def run_async(setup: ThreeTierSetup, state: GanState, tick: Callable[[], bool]) -> None:
    """Asynchronous global phase: apply the regions' reports in time order."""
    cfg = setup.cfg
    budget = cfg.schedule.time_budget_s
    if state.version == 0 and not state.pending:
        for k in range(setup.regions):
            launch(setup, state, k, 0.0)
    while state.version < cfg.gan.i_gl * setup.regions:
        event = min(state.pending, key=lambda e: (e["time"], e["region"]))
        if budget is not None and event["time"] > budget:
            break
        state.pending.remove(event)
        k, now = event["region"], event["time"]
        for key, value in event["totals"].items():
            setup.costs.totals[key] += value
        for c, value in event["client_bytes"].items():
            setup.costs.client_bytes[c] += value
        state.reported[k], state.losses[k] = event["g"], event["loss"]
        state.version += 1
        state.versions[k] = state.version
        state.generator_updates += event["updates"]
        ages = np.array([state.version - v if v >= 0 else 0 for v in state.versions])
        cloud_update(setup, state, ages)
        down = 4 * state.g.numel() if cfg.gan.aggregate == "parameters" else 0
        setup.costs.relay(now, up_bytes=event["bytes"], down_bytes=down)
        setup.costs.totals["rounds"] += 1
        _record(state, now, k, ages)
        restart(setup, state, k)
        launch(setup, state, k, now)
        if tick():
            break


# ----------------------------------------------------------------------------------- sampling


@torch.no_grad()
def sample(setup: ThreeTierSetup, state: GanState, n: int, seed: int) -> torch.Tensor:
    """n images [n, C, H, W] of the global generator (eval mode: BatchNorm's running
    statistics), z from the stream (seed, "gan-sample"); a mixture picks component k with
    probability w_k from (seed, "gan-sample-mixture")."""
    g = setup.cfg.gan
    z = torch.randn(n, g.z_dim, generator=torch_generator(seed, "gan-sample"))
    model = setup.sampler_model
    if g.aggregate == "parameters":
        setup.layout.load(model, state.g)
        return torch.cat([model(c) for c in z.split(SAMPLE_CHUNK)])
    w = torch.tensor(state.weights, dtype=torch.float64)
    comp = torch.multinomial(
        w, n, replacement=True, generator=torch_generator(seed, "gan-sample-mixture")
    )
    out = torch.empty(n, *setup.data[0].shape[1:])
    for k in range(setup.regions):
        rows = (comp == k).nonzero().flatten()
        if len(rows):
            setup.layout.load(model, state.reported[k])
            out[rows] = torch.cat([model(c) for c in z[rows].split(SAMPLE_CHUNK)])
    return out


def tier_bytes(totals: dict[str, float]) -> dict[str, float]:
    """Bytes per link: samples edge → device, feedback device → edge, generator uploads edge →
    cloud, the global generator cloud → edge."""
    return {
        "edge_device_samples": float(totals.get("bytes_edge_client", 0.0)),
        "device_edge_feedback": float(totals.get("bytes_client_edge", 0.0)),
        "edge_cloud_generator": float(totals.get("bytes_edge_cloud", 0.0)),
        "cloud_edge_generator": float(totals.get("bytes_cloud_edge", 0.0)),
    }


# -------------------------------------------------------------------------------------- run


def run_three_tier(
    cfg: Config,
    regions: Sequence[Sequence[torch.Tensor]],
    *,
    on_eval: Callable[[dict[str, Any], Sampler], None] | None = None,
    state: GanState | None = None,
    on_checkpoint: Callable[[GanState], None] | None = None,
    progress: bool = False,
) -> ThreeTierResult:
    """Train seed 001's three-tier GAN (module docstring) on ``regions`` (region k → device
    j → real images [n, C, H, W] in [-1, 1]) with ``cfg.gan``, ``cfg.topology`` (edges =
    regions, clients = devices; device profiles for the clock), ``cfg.costs``, ``cfg.upload``
    (codecs for the feedback and the generator uploads), ``cfg.schedule.time_budget_s`` and
    ``cfg.seed``.

    ``on_eval(record, sample)`` is called every ``cfg.eval.every`` cloud updates (async:
    every ``eval.every`` × K reports) and at the end, with a record (``round`` = cloud updates,
    ``generator_updates``, ``time_s``, ``wall_s``, ``weights``, ``losses``, ``stages``,
    ``costs``, ``bytes``) and ``sample(n, seed)`` → images of the current global generator.
    ``state`` resumes a run from a checkpoint (``GanState.from_dict``); ``on_checkpoint``
    receives the state after every evaluation. Same config, data and seed → same numbers."""
    t0 = time.perf_counter()
    setup = prepare_three_tier(cfg, regions)
    state = state if state is not None else init_state(setup)
    restore(setup, state)
    g = cfg.gan
    total = g.i_gl if g.update == "sync" else g.i_gl * setup.regions
    every = cfg.eval.every if g.update == "sync" else cfg.eval.every * setup.regions
    bar = tqdm(total=total, initial=state.version, desc="three-tier GAN", disable=not progress)

    def sampler(n: int, seed: int) -> torch.Tensor:
        return sample(setup, state, n, seed)

    evaluated = [-1]

    def evaluate() -> None:
        if evaluated[0] == state.version:  # the budget ended the run at an evaluation
            return
        evaluated[0] = state.version
        if on_eval is not None:
            record = {
                "round": state.version,
                "generator_updates": state.generator_updates,
                "time_s": float(setup.costs.totals["time_s"]),
                "wall_s": time.perf_counter() - t0,
                "weights": list(state.weights),
                "losses": reported_losses(state),
                "stages": reduce_stages(state.stages),
                "costs": setup.costs.snapshot(),
                "bytes": tier_bytes(setup.costs.totals),
            }
            on_eval(record, sampler)
        state.stages.clear()
        if on_checkpoint is not None:
            on_checkpoint(capture(setup, state))

    def tick() -> bool:
        bar.update(1)
        if state.version % every == 0 and state.version < total:
            evaluate()
        return False

    try:
        (run_sync if g.update == "sync" else run_async)(setup, state, tick)
    finally:
        bar.close()
    evaluate()
    capture(setup, state)
    generator = None
    if g.aggregate == "parameters":
        generator = copy.deepcopy(setup.sampler_model)
        setup.layout.load(generator, state.g)
        generator.eval()
    totals = setup.costs.totals
    return ThreeTierResult(
        generator=generator,
        sample=sampler,
        history=state.history,
        bytes=tier_bytes(totals),
        time_s=float(totals["time_s"]),
        wall_s=time.perf_counter() - t0,
        generator_updates=state.generator_updates,
        global_steps=state.version,
        costs=setup.costs.snapshot(),
        state=state,
    )
