"""Deploying a federated diffusion model (SS-Diff, SPEC §8–9): collaborative sampling, its
costs, and the quality of what it generates.

After an arm of a ``diffusion`` task has trained, :func:`generation_report`

* draws ``samples`` initial noises x_T, spread over all devices (device c draws its own
  from the stream ``(seed, "sampling", c)``), and samples them collaboratively: each edge
  runs the first t = ``shared_steps`` DDIM steps on its devices' batch, the devices finish
  (simulated on the same batch: DDIM with η = 0 is per image, so the split changes no
  value); the same x_T with the model before fine-tuning, for a paired comparison;
* scores both sets with the in-house judge (:mod:`fedtier.generative`, trained on the whole
  training set, all classes): FID against the test images of the run's classes, the share of
  samples in each class, the mean confidence (max softmax), and for the model before
  fine-tuning also FID against the test images of its pretraining classes;
* writes a sample grid PNG per model under ``plots/``;
* prices the sampling with :mod:`fedtier.costs.sampling` (recorded in the cost ledger) and
  tabulates device energy and latency for every t from 0 (device-only) to S (edge-only).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtier.config import Config, DiffusionTaskConfig
from fedtier.costs.flops import count_flops
from fedtier.costs.sampling import SamplingCosts, collaborative_costs, record_sampling
from fedtier.data import ArrayDataset, select_classes
from fedtier.generative import FID_NOTE, FidScorer, Judge, class_coverage, sample_grid, train_judge
from fedtier.local.arm import ArmSetup
from fedtier.security import file_stem
from fedtier.seeding import torch_generator
from fedtier.tasks.diffusion import DiffusionTask, collaborative_sample, ddim_scheduler

_SCORED: dict[str, dict[str, Any]] = {}  # the model before fine-tuning, scored once per process


def wants_generation(cfg: Config) -> bool:
    """True for an arm whose task is ``diffusion`` with ``samples`` > 0."""
    t = cfg.train.task
    return isinstance(t, DiffusionTaskConfig) and t.samples > 0


def requests(num_clients: int, samples: int) -> np.ndarray:
    """Images requested by each of the devices [N]: ``samples`` spread as evenly as possible
    (the first ``samples mod N`` devices one more)."""
    base, extra = divmod(samples, num_clients)
    return np.array([base + (c < extra) for c in range(num_clients)])


def initial_noise(seed: int, client: int, count: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Device ``client``'s x_T [count, *shape] from its own stream (seed, "sampling", client)."""
    return torch.randn((count, *shape), generator=torch_generator(seed, "sampling", client))


def merge(parts: list[SamplingCosts]) -> dict[str, float]:
    """One table row over the edges (run in parallel): devices' mean energy and latency,
    the slowest device, the slowest edge's time, the edges' energy and bytes summed."""
    energy = np.concatenate([p.device_energy_j for p in parts])
    latency = np.concatenate([p.device_latency_s for p in parts])
    return {
        "t": parts[0].shared,
        "device_energy_j": float(energy.mean()),
        "device_latency_s": float(latency.mean()),
        "max_latency_s": float(latency.max()),
        "edge_time_s": max(p.edge_time_s for p in parts),
        "edge_energy_j": sum(p.edge_energy_j for p in parts),
        "bytes_up": sum(p.bytes_up for p in parts),
        "bytes_down": sum(p.bytes_down for p in parts),
    }


def generation_report(
    setup: ArmSetup,
    w_before: torch.Tensor,
    w_after: torch.Tensor,
    data: tuple[ArrayDataset, ArrayDataset],
    out: Path,
    arm: str,
) -> dict[str, Any]:
    """Sample, score and price the arm's model before (``w_before`` [P]) and after
    (``w_after``) fine-tuning (see the module docstring); ``data`` is the unfiltered
    (train, test) of the data set. Returns the summary entry ``generation``."""
    cfg = setup.cfg
    tcfg = cfg.train.task
    assert isinstance(tcfg, DiffusionTaskConfig) and isinstance(setup.task, DiffusionTask)
    train, test = data
    judge = train_judge(train.x, train.y, seed=cfg.seed, num_classes=train.num_classes)
    real = select_classes(test, cfg.data.classes)
    topo = setup.topology
    counts = requests(topo.num_clients, tcfg.samples)
    shape = tuple(train.input_shape)
    x_t = {c: initial_noise(cfg.seed, c, int(counts[c]), shape) for c in range(topo.num_clients)}
    sched = ddim_scheduler(setup.task)
    steps, shared, clip = setup.task.sample_steps, tcfg.shared_steps, tcfg.clip_x0
    model = setup.model

    def generate(w: torch.Tensor) -> torch.Tensor:
        setup.layout.load(model, w)
        outs = []
        for clients in topo.edge_clients:
            batch = torch.cat([x_t[int(c)] for c in clients])
            if len(batch):
                outs.append(collaborative_sample(model, sched, batch, steps, shared, clip)[0].cpu())
        return torch.cat(outs).clamp(-1, 1)  # images live in [-1, 1]

    scorer = FidScorer(real.x, judge)
    plots = out / "plots"
    key = _before_key(w_before, cfg, tcfg, out)
    before = _SCORED.get(key)
    if before is None:
        fake = generate(w_before)
        before = _score(fake, scorer, judge, real)
        pre = cfg.pretrain.classes if cfg.pretrain is not None else None
        if pre is not None:
            before["pretrain_classes"] = pre
            before["fid_pretrain_classes"] = FidScorer(
                select_classes(test, pre, "pretrain.classes").x, judge
            ).score(fake)
        before["grid"] = _grid(fake, tcfg.grid, plots / "samples-before-fine-tuning.png")
        _SCORED[key] = before
    fake = generate(w_after)
    after = _score(fake, scorer, judge, real)
    after["grid"] = _grid(fake, tcfg.grid, plots / f"samples-{file_stem(arm)}.png")
    setup.layout.load(model, w_after)

    one = torch.zeros((1, *shape))
    flops = count_flops(lambda: model(one, torch.zeros(1, dtype=torch.long)))
    cycles = flops / cfg.costs.flops_per_cycle
    assert setup.costs is not None
    d = int(np.prod(shape))

    def costs_at(t: int) -> list[SamplingCosts]:
        return [
            collaborative_costs(setup.costs, [int(c) for c in cl], counts[cl], d, steps, t, cycles)
            for cl in topo.edge_clients
            if len(cl)
        ]

    used = costs_at(shared)
    for part in used:
        record_sampling(setup.costs, part)
    return {
        "fid_note": FID_NOTE,
        "judge": {"cached": judge.cached, "train_s": round(judge.train_seconds, 1)},
        "samples": int(counts.sum()),
        "classes": cfg.data.classes,
        "before": before,
        "after": after,
        "sampling": {
            "steps": steps,
            "shared_steps": shared,
            "clip_x0": clip,
            "flops_per_image_step": flops,
            "used": merge(used),
            "table": [merge(costs_at(t)) for t in range(steps + 1)],
        },
    }


def _score(
    fake: torch.Tensor, scorer: FidScorer, judge: Judge, real: ArrayDataset
) -> dict[str, Any]:
    cov = class_coverage(fake, judge, real.y)
    return {
        "fid": scorer.score(fake),
        "class_shares": cov["class_shares"],
        "mean_confidence": cov["mean_confidence"],
    }


def _grid(fake: torch.Tensor, count: int, path: Path) -> str | None:
    if count <= 0:
        return None
    return sample_grid(fake[:count], path, nrow=8, scale=4).name


def _before_key(w: torch.Tensor, cfg: Config, tcfg: DiffusionTaskConfig, out: Path) -> str:
    h = hashlib.sha256(w.detach().cpu().numpy().tobytes())
    h.update(repr((cfg.seed, cfg.topology, cfg.data, cfg.pretrain, tcfg, str(out))).encode())
    return h.hexdigest()
