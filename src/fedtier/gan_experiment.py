"""GAN arms of ``fedtier run`` (train.task: gan): the three-tier GAN (seed 001), FedAvg of
whole GANs through the ordinary round loop, and a centrally trained reference GAN.

Every method takes the same number of generator updates (gan.i_gl rounds × gan.i_lo
updates along the path to the final generator), with the same G, D, Adam settings and batch
size (the ``gan`` section), and is evaluated the same way: every ``eval.every`` rounds the
in-house FID of ``fid_samples`` samples (fedtier.generative's judge, trained on the run's
data — not Inception), and at the end the coverage metrics of ``final_samples`` samples, a
grid of samples (PNG) and, when regions hold different sources (the label-related
scenario), the share of samples per source and the FID per source.

Images are mapped to [-1, 1] (the generator's tanh range) before anything trains on them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedtier.checkpoint import save_model
from fedtier.config import Config, GanTaskConfig
from fedtier.costs import CostModel
from fedtier.data import ArrayDataset, ClientData
from fedtier.data.partition import apply_domain
from fedtier.gan import check_three_tier, run_three_tier
from fedtier.gan.three_tier import Sampler, ThreeTierResult
from fedtier.local.arm import ArmSetup
from fedtier.local.select import close_executor, select_executor
from fedtier.metrics import MetricSpec
from fedtier.models import build_model
from fedtier.quant import QuantSpec
from fedtier.results import RunWriter
from fedtier.schedules import run_schedule
from fedtier.seeding import derive_seed, torch_generator
from fedtier.state import StateLayout
from fedtier.tasks.gan import GAN_GROUPS, GanPair, GanTask, latent_size, sample, train_central
from fedtier.topology import Topology, plan_round
from fedtier.upload import build_chain

if TYPE_CHECKING:  # fedtier.generative (torchmetrics) loads when a GAN arm is scored
    from fedtier.generative import FidScorer, Judge

EVAL_METRICS: dict[str, MetricSpec] = {
    "fid": MetricSpec("FID (in-house judge, not Inception)", higher_is_better=False, fmt=".1f"),
    "kl": MetricSpec("KL(data ‖ generated classes)", "nats", higher_is_better=False, fmt=".3f"),
    "confidence": MetricSpec("Judge's mean confidence", fmt=".3f"),
}


def gan_task_config(cfg: Config) -> GanTaskConfig:
    """The arm's train.task (a GAN arm's)."""
    task = cfg.train.task
    assert isinstance(task, GanTaskConfig), "not a GAN arm"
    return task


def is_gan(cfg: Config) -> bool:
    return isinstance(cfg.train.task, GanTaskConfig)


def gan_arm_config(cfg: Config) -> Config:
    """A GAN arm's config as the round loop reads it: train.rounds = gan.i_gl and
    train.batch_size = gan.batch_size (one place for each setting: the ``gan`` section)."""
    if not is_gan(cfg):
        return cfg
    train = cfg.train.model_copy(update={"rounds": cfg.gan.i_gl, "batch_size": cfg.gan.batch_size})
    return cfg.model_copy(update={"train": train})


def to_unit_range(x: torch.Tensor, reference: ArrayDataset) -> torch.Tensor:
    """x mapped affinely so that ``reference``'s smallest value is −1 and its largest +1
    (clamped): a standardised data set back to the generator's tanh range."""
    lo, hi = float(reference.x.min()), float(reference.x.max())
    return ((x - lo) / (hi - lo) * 2 - 1).clamp_(-1, 1)


def check_gan_arm(cfg: Config) -> None:
    """Refuse, before any data is loaded, what cannot apply to a GAN arm's method: the
    three-tier GAN's rules, codecs, attacks and schedules (fedtier.gan.check_three_tier);
    what no GAN arm can take is refused when the config is read (fedtier.config)."""
    if is_gan(cfg) and gan_task_config(cfg).method == "three-tier":
        check_three_tier(cfg)


def build_pair(cfg: Config, input_shape: tuple[int, int, int], num_classes: int) -> GanPair:
    """G and D of the ``gan`` section (G's factory gets z_dim), seeded by cfg.seed."""
    g = cfg.gan
    torch.manual_seed(cfg.seed)
    gen = build_model(
        g.generator.name, input_shape, num_classes, **{"z_dim": g.z_dim, **g.generator.options}
    )
    disc = build_model(g.discriminator.name, input_shape, num_classes, **g.discriminator.options)
    return GanPair(gen, disc, latent_size(gen))


def gan_task(cfg: Config) -> GanTask:
    """The FedAvg/central task of the ``gan`` section's settings (no scorer yet)."""
    g = cfg.gan
    return GanTask(
        local_steps=g.i_lo,
        lr_g=g.lr_g,
        lr_d=g.lr_d,
        betas=(g.beta1, g.beta2),
        minimax=g.generator_loss == "minimax",
        eval_samples=gan_task_config(cfg).fid_samples,
        eval_seed=eval_seed(cfg.seed),
    )


def prepare_gan_arm(
    cfg: Config,
    train: ArrayDataset,
    test: ArrayDataset,
    topology: Topology,
    parts: list[np.ndarray],
    edge_of_client: np.ndarray | None,
    device: torch.device,
) -> ArmSetup:
    """The arm's setup: a :class:`GanPair` as the model, the :class:`GanTask` (FedAvg of
    whole GANs: both groups uploaded), the clients' data mapped to [-1, 1] (label-related
    partition: region r sees :func:`fedtier.data.partition.apply_domain` of it), the upload
    chain, the cost model and the client executor (the task has its own local update:
    sequential or worker processes). The task's scorer is attached when the arm runs."""
    cfg = gan_arm_config(cfg)
    x, test_x = to_unit_range(train.x, train), to_unit_range(test.x, train)
    if cfg.data.partition == "label" and edge_of_client is not None:
        views = tuple(apply_domain(x, r) for r in range(topology.num_edges))
        client_data = ClientData(views, train.y, tuple(parts), edge_of_client)
        test_x = torch.cat([apply_domain(test_x, r) for r in range(topology.num_edges)])
        test = ArrayDataset(test_x, test.y.repeat(topology.num_edges), test.num_classes, test.name)
    else:
        client_data = ClientData((x,), train.y, tuple(parts))
        test = ArrayDataset(test_x, test.y, test.num_classes, test.name)
    pair = build_pair(cfg, train.input_shape, train.num_classes).to(device)
    GAN_GROUPS.check(pair)
    layout = StateLayout.of(pair, GAN_GROUPS.uploads)
    setup = ArmSetup(
        cfg=cfg,
        model=pair,
        task=gan_task(cfg),
        layout=layout,
        client_data=client_data,
        test=test,
        topology=topology,
        spec=QuantSpec(cfg.quant.quantizer, cfg.quant.params),
        target_bits=[32],
        upload=build_chain(cfg.upload),
        costs=CostModel(cfg.costs, gan_compute(cfg, topology), 1, layout.size),
    )

    setup.executor_name = select_executor(setup)
    return setup


def gan_compute(cfg: Config, topology: Topology) -> Topology:
    """The topology the cost model prices a FedAvg-GAN round with: each device computes
    gan.i_lo iterations of 3B sample passes (B real and B generated for D's step, B
    generated for G's), as a three-tier device does per local phase (fedtier.gan)."""
    passes = 3 * cfg.gan.batch_size * cfg.gan.i_lo
    return dataclasses.replace(topology, num_samples=np.full(topology.num_clients, passes))


# ------------------------------------------------------------------------------ scoring


@dataclass(eq=False)
class JudgeScorer:
    """The evaluation of generated samples (a :class:`fedtier.tasks.gan.Scorer`): FID
    against the clients' data on the judge's features (torchmetrics; in-house, not
    Inception), the KL of the data's class distribution from the samples' and the judge's
    mean confidence."""

    judge: Judge
    fid: FidScorer
    labels: torch.Tensor  # [N] the data's classes (the KL's reference distribution)

    @property
    def metrics(self) -> Mapping[str, MetricSpec]:
        return EVAL_METRICS

    @property
    def headline(self) -> str:
        return "fid"

    def __call__(self, samples: torch.Tensor) -> dict[str, float]:
        from fedtier.generative import class_coverage

        cov = class_coverage(samples, self.judge, self.labels)
        return {
            "fid": self.fid.score(samples),
            "kl": cov["kl_data_generated"],
            "confidence": cov["mean_confidence"],
        }


@dataclass(eq=False)
class Scoring:
    """Everything an arm's samples are judged by: the class judge and its scorer, each
    region's classes, and (regions of different sources) the source judge with a FID
    scorer per source."""

    scorer: JudgeScorer
    region_classes: list[list[int]]
    source_judge: Judge | None = None
    source_fid: list[FidScorer] | None = None


def build_scoring(setup: ArmSetup, union: ArrayDataset, sources: np.ndarray) -> Scoring:
    """Train (or load from fedtier.generative's cache) the judges on the clients' data
    ``union`` (x in [-1, 1]) with ``sources`` [N] the region each sample comes from."""
    from fedtier.generative import train_judge

    cfg = setup.cfg
    epochs = gan_task_config(cfg).judge_epochs
    judge = train_judge(
        union.x, union.y, seed=cfg.seed, num_classes=union.num_classes, epochs=epochs
    )
    scorer = JudgeScorer(judge, real_fid(judge, union.x, (judge.key,)), union.y)
    regions = sorted(set(sources.tolist()))
    region_classes = [sorted(set(union.y[sources == r].tolist())) for r in regions]
    if cfg.data.partition not in ("label", "source") or len(regions) < 2:
        return Scoring(scorer, region_classes)
    source_labels = torch.from_numpy(sources).long()
    source_judge = train_judge(
        union.x, source_labels, seed=cfg.seed, num_classes=len(regions), epochs=epochs
    )
    per_source = [
        real_fid(judge, union.x[sources == r], (judge.key, source_judge.key, r)) for r in regions
    ]
    return Scoring(scorer, region_classes, source_judge, per_source)


# (judge key, subset) → FidScorer: a pure memo (its real features are a function of the judge
# and the images its key hashes), so every arm of a run reuses them instead of recomputing
_REAL_FID: dict[tuple[Any, ...], FidScorer] = {}


def real_fid(judge: Judge, real: torch.Tensor, key: tuple[Any, ...]) -> FidScorer:
    """A :class:`fedtier.generative.FidScorer` of ``real`` [N, C, H, W] on ``judge``'s
    features, computed once per ``key`` (the judges' cache keys hash the images)."""
    from fedtier.generative import FidScorer

    if key not in _REAL_FID:
        if len(_REAL_FID) >= 16:
            _REAL_FID.clear()
        _REAL_FID[key] = FidScorer(real, judge)
    return _REAL_FID[key]


def union_of_clients(setup: ArmSetup) -> tuple[ArrayDataset, np.ndarray]:
    """Every client's samples as the clients see them (x in [-1, 1]), edge by edge — the
    data a central GAN trains on and the judges learn — and the region of each [N]."""
    xs, ys, regions = [], [], []
    for edge, clients in enumerate(setup.topology.edge_clients):
        for c in clients.tolist():
            x, y = setup.client_data(c)
            xs.append(x)
            ys.append(y)
            regions.append(np.full(len(y), edge))
    data = ArrayDataset(torch.cat(xs), torch.cat(ys), setup.test.num_classes, setup.test.name)
    return data, np.concatenate(regions)


def final_report(scoring: Scoring, samples: torch.Tensor, grid: Any) -> dict[str, Any]:
    """The final metrics of ``samples`` [N, C, H, W] (every arm's from the same z): FID,
    class shares and KL from the data's, mean confidence, per region the fraction of its
    classes produced confidently; with a source judge the share per source and the FID per
    source (of the samples the source judge assigns to it, against that source's data).
    Writes the first 100 samples as a 10 × 10 PNG grid at ``grid``."""
    from fedtier.generative import (
        FID_NOTE,
        class_coverage,
        region_coverage,
        sample_grid,
        source_shares,
    )

    s = scoring.scorer
    cov = class_coverage(samples, s.judge, s.labels)
    regions = region_coverage(samples, s.judge, scoring.region_classes)
    out: dict[str, Any] = {
        "samples": len(samples),
        "fid": s.fid.score(samples),
        "fid_note": FID_NOTE,
        "class_shares": cov["class_shares"],
        "data_shares": cov["data_shares"],
        "kl": cov["kl_data_generated"],
        "confidence": cov["mean_confidence"],
        "confident_share": cov["confident_share"],
        "region_coverage": regions["fraction"],
        "region_classes": scoring.region_classes,
        "grid": sample_grid(samples[:100], grid, nrow=10).name,
    }
    if scoring.source_judge is not None and scoring.source_fid is not None:
        out["source_shares"] = source_shares(samples, scoring.source_judge)
        assigned = scoring.source_judge.probs(samples).argmax(1)
        out["source_fid"] = [
            f.score(samples[assigned == r]) if int((assigned == r).sum()) >= 2 else None
            for r, f in enumerate(scoring.source_fid)
        ]
    return out


# ------------------------------------------------------------------------------ running


def run_gan_arm(
    arm: str,
    setup: ArmSetup,
    writer: RunWriter,
    on_round: Callable[[int], None],
) -> dict[str, Any]:
    """Train one GAN arm by its method, logging an evaluation record every eval.every rounds
    (FID, KL, confidence and the discriminator's numbers; generator updates, bytes, wall
    time); returns the arm's summary entry with the final metrics (:func:`final_report`);
    writes samples-<arm>.png."""
    cfg = setup.cfg
    task_cfg = gan_task_config(cfg)
    union, sources = union_of_clients(setup)
    scoring = build_scoring(setup, union, sources)
    assert isinstance(setup.task, GanTask)
    setup.task = replace(setup.task, scorer=scoring.scorer)
    start = time.perf_counter()
    last: dict[str, Any] = {}

    def on_eval(record: dict[str, Any]) -> None:
        rounds = round_equivalents(cfg, record["round"])
        record = {
            "arm": arm,
            **record,
            "generator_updates": rounds * cfg.gan.i_lo,
            "generator_updates_all": record.get(
                "generator_updates_all", rounds * cfg.gan.i_lo * parallel_generators(setup)
            ),
            "wall_s": round(time.perf_counter() - start, 3),
        }
        writer.log(record)
        last.clear()
        last.update(record)

    writer.log(
        {
            "arm": arm,
            "event": "setup",
            "method": task_cfg.method,
            "executor": setup.executor_name,
            "task": task_record(setup.task),
        }
    )
    pair = setup.model
    assert isinstance(pair, GanPair)
    three: ThreeTierResult | None = None
    try:
        if task_cfg.method == "fedavg":
            w = run_schedule(setup, on_eval, on_round=on_round)
            setup.layout.load(pair, w)
        elif task_cfg.method == "central":
            run_central(setup, union.x, on_eval, on_round)
        else:
            three = run_three_tier(
                cfg, device_regions(setup), on_eval=three_tier_eval(setup, on_eval, on_round)
            )
            if three.generator is not None:  # parameter aggregation: one global G
                pair.generator.load_state_dict(three.generator.state_dict())
    finally:
        close_executor(setup)
    wall = time.perf_counter() - start
    if three is None or three.generator is not None:
        state = dict(pair.state_dict())
        if three is not None:  # the three-tier GAN's discriminators stay on the devices
            state = {k: v for k, v in state.items() if k.startswith("generator.")}
        save_model(writer.out, arm, state, setup.test.input_shape, setup.test.num_classes)
    if three is not None:
        samples = three.sample(task_cfg.final_samples, final_seed(cfg.seed))
    else:
        samples = final_samples(pair, task_cfg.final_samples, cfg.seed)
    entry: dict[str, Any] = {
        "method": task_cfg.method,
        "metrics": last.get("bits", {}),
        "task": task_record(setup.task),
        "rounds": round_equivalents(cfg, last.get("round", 0)),  # done (a time budget may stop it)
        "generator_updates": last.get("generator_updates", 0),
        "generator_updates_all": last.get("generator_updates_all", 0),
        "wall_s": round(wall, 3),
        "target_bits": [32],
        "rule": cfg.aggregate.rule,
        "qat": False,
        "gan": final_report(scoring, samples, writer.out / f"samples-{arm}.png"),
    }
    if "costs" in last:
        entry["costs"] = last["costs"]
    if three is not None:
        entry["weights"] = [h["weights"] for h in three.history]
        entry["losses"] = [h["losses"] for h in three.history]
        entry["time_s"] = three.time_s
        entry["global_steps"] = three.global_steps
    return entry


def device_regions(setup: ArmSetup) -> list[list[torch.Tensor]]:
    """Region k → device j → its images [n, C, H, W] in [-1, 1] (the three-tier GAN's data,
    devices numbered region by region as the arm's topology has them)."""
    return [
        [setup.client_data(c)[0] for c in clients.tolist()]
        for clients in setup.topology.edge_clients
    ]


def three_tier_eval(
    setup: ArmSetup,
    on_eval: Callable[[dict[str, Any]], None],
    on_round: Callable[[int], None],
) -> Callable[[dict[str, Any], Sampler], None]:
    """The three-tier run's evaluation callback: the scorer's metrics of fid_samples samples
    of the global generator (z from the run's evaluation stream, as the other arms' are) in
    a record shaped like the round loop's, plus the region weights and losses; the progress
    bar advances to the record's round."""
    cfg = setup.cfg
    task = setup.task
    assert isinstance(task, GanTask) and task.scorer is not None
    scorer = task.scorer
    done = [0]

    def on_three(record: dict[str, Any], sampler: Sampler) -> None:
        samples = sampler(task.eval_samples, eval_seed(cfg.seed))
        on_eval(
            {
                "round": record["round"],
                "bits": {"32": scorer(samples)},
                "generator_updates_all": record["generator_updates"],
                "costs": record["costs"],
                "bytes": record["bytes"],
                "weights": record["weights"],
                "losses": record["losses"],
            }
        )
        rounds = round_equivalents(cfg, record["round"])
        while done[0] < rounds:
            on_round(done[0])
            done[0] += 1

    return on_three


def round_equivalents(cfg: Config, cloud_updates: int) -> float:
    """Global rounds that ``cloud_updates`` amount to: one per update, but K reports make a
    round under the three-tier GAN's asynchronous global phase."""
    if gan_task_config(cfg).method == "three-tier" and cfg.gan.update == "async":
        return cloud_updates / cfg.topology.edges
    return float(cloud_updates)


def parallel_generators(setup: ArmSetup) -> int:
    """Generator copies that take each update in parallel: every device's under FedAvg, one
    central, one per region for the three-tier GAN."""
    method = gan_task_config(setup.cfg).method
    if method == "fedavg":
        return len(plan_clients(setup))
    return 1 if method == "central" else setup.topology.num_edges


def plan_clients(setup: ArmSetup) -> list[int]:
    """The clients FedAvg trains in a round (round 0's plan; every round samples as many)."""
    cfg = setup.cfg
    return plan_round(setup.topology, cfg.topology, cfg.seed, 0).clients


def eval_seed(seed: int) -> int:
    """The seed of the evaluation samples' z (one stream for every arm and evaluation)."""
    return derive_seed(seed, "gan-eval")


def final_seed(seed: int) -> int:
    """The seed of the final samples' z (one stream for every arm)."""
    return derive_seed(seed, "gan-final")


def task_record(task: GanTask) -> dict[str, Any]:
    """The task's headline, tables and metric specs (as fedtier.experiment records them)."""
    return {
        "headline": task.headline,
        "tables": list(task.tables),
        "metrics": {name: spec.to_dict() for name, spec in task.metrics.items()},
    }


def run_central(
    setup: ArmSetup,
    x: torch.Tensor,
    on_eval: Callable[[dict[str, Any]], None],
    on_round: Callable[[int], None],
) -> None:
    """The central reference: gan.i_gl × gan.i_lo generator steps on all the clients' data
    x (:func:`fedtier.tasks.gan.train_central`, one Adam state), evaluated at the rounds the
    federated arms are (every eval.every rounds of gan.i_lo steps, and after the last)."""
    cfg = setup.cfg
    task = setup.task
    assert isinstance(task, GanTask)
    pair = setup.model
    assert isinstance(pair, GanPair)
    opt = None
    steps = cfg.gan.i_lo
    for t in range(cfg.train.rounds):
        opt = train_central(
            pair, x, steps, cfg.train.batch_size, task, cfg.seed, start=t * steps, opt=opt
        )
        r = t + 1
        if r % cfg.eval.every == 0 or r == cfg.train.rounds:
            metrics = task.evaluate(pair, setup.test, cfg.eval.batch_size)
            pair.train()
            on_eval({"round": r, "bits": {"32": metrics}})
        on_round(t)


def final_samples(pair: GanPair, n: int, seed: int) -> torch.Tensor:
    """The n samples [n, C, H, W] every arm's final metrics are computed on (G in eval mode,
    z from the stream ``(final_seed(seed), "gan-sample")``, the same for every arm)."""
    pair.eval()
    return sample(pair, n, torch_generator(final_seed(seed), "gan-sample"))
