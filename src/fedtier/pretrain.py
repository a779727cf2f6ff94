"""The provider's model: central pretraining before federated fine-tuning (SS-Diff, SPEC §8).

A config's ``pretrain`` section trains the arm's model centrally on the classes it names
(default preset: MNIST-5k digits 0–4) with Adam, a linear warm-up and a cosine decay, on the
task's own loss (the DDPM objective for a diffusion task). The result is cached as
``$FEDTIER_CACHE/pretrained/<key>.safetensors`` (default ``~/.cache/fedtier``) beside a
``<key>.json`` with its settings and training time; the key is a SHA-256 of everything the
weights depend on (model, options, data set, classes, task schedule, pretraining settings,
seed), so a preset builds it once and every later run, arm and ``fedtier pretrain`` reuses it.

Randomness: initial weights as the run's own (``torch.manual_seed(seed)`` before building),
then for step s one generator ``(seed, "pretrain", s)`` draws the batch's indices and the
loss's noise and timesteps.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fedtier.config import Config, to_dict
from fedtier.data import ArrayDataset, select_classes
from fedtier.errors import FedtierError
from fedtier.models import build_model
from fedtier.seeding import torch_generator
from fedtier.tasks import ClientTask, client_batch

PRETRAIN_VERSION = 1  # part of the cache key: bump when the training loop changes
# fields of a task config that change sampling, not training (not part of the cache key)
SAMPLING_FIELDS = frozenset({"sample_steps", "shared_steps", "samples", "grid", "clip_x0"})


def cache_root() -> Path:
    """``$FEDTIER_CACHE`` (default ``~/.cache/fedtier``)."""
    root = os.environ.get("FEDTIER_CACHE") or os.path.join("~", ".cache", "fedtier")
    return Path(root).expanduser()


@dataclass(frozen=True)
class Pretrained:
    """A pretrained model in the cache: its weights file, settings and training time."""

    path: Path
    key: str
    seconds: float  # wall-clock time of the run that trained it
    cached: bool  # True: found in the cache, not trained now
    info: dict[str, Any]


def pretrain_settings(cfg: Config) -> dict[str, Any]:
    """Everything the pretrained weights depend on (the cache key hashes it)."""
    assert cfg.pretrain is not None
    return {
        "version": PRETRAIN_VERSION,
        "seed": cfg.seed,
        "model": {"name": cfg.model.name, "options": cfg.model.options},
        "data": {"dataset": cfg.data.dataset, "root": cfg.data.root},
        "task": {k: v for k, v in to_dict(cfg.train.task).items() if k not in SAMPLING_FIELDS},
        "pretrain": to_dict(cfg.pretrain),
    }


def pretrain_key(cfg: Config) -> str:
    blob = json.dumps(pretrain_settings(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def pretrained_path(cfg: Config) -> Path:
    return cache_root() / "pretrained" / f"{pretrain_key(cfg)}.safetensors"


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def ensure_pretrained(
    cfg: Config, train: ArrayDataset, task: ClientTask, progress: bool = True
) -> Pretrained:
    """The cached pretrained model of ``cfg`` (its ``pretrain`` section), trained now on
    ``train``'s ``pretrain.classes`` if the cache does not hold it yet."""
    if cfg.pretrain is None:
        raise FedtierError("pretrain: the config has no 'pretrain' section")
    path = pretrained_path(cfg)
    meta = path.with_suffix(".json")
    key = pretrain_key(cfg)
    if path.is_file() and meta.is_file():
        try:
            info = json.loads(meta.read_text())
            return Pretrained(path, key, float(info["seconds"]), True, info)
        except (ValueError, KeyError):
            pass  # an unreadable record: train again and rewrite it
    data = select_classes(train, cfg.pretrain.classes, "pretrain.classes")
    p = cfg.pretrain
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model.name, data.input_shape, data.num_classes, **cfg.model.options)
    opt = torch.optim.Adam(model.parameters(), lr=p.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, p.steps, p.warmup))
    model.train()
    start = time.perf_counter()
    losses: list[float] = []
    with tqdm(total=p.steps, desc="pretrain", unit="step", disable=not progress) as bar:
        for step in range(p.steps):
            g = torch_generator(cfg.seed, "pretrain", step)
            idx = torch.randint(0, len(data), (p.batch_size,), generator=g)
            loss = task.loss(model, client_batch(task, data.x[idx], data.y[idx]), g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            if step % 50 == 49:
                bar.set_postfix(loss=f"{sum(losses[-50:]) / 50:.4f}")
            bar.update()
    seconds = time.perf_counter() - start
    info = {
        **pretrain_settings(cfg),
        "seconds": round(seconds, 1),
        "samples": len(data),
        "final_loss": sum(losses[-100:]) / len(losses[-100:]),
    }
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{key}.tmp"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    meta.write_text(json.dumps(info, indent=1, default=str))
    return Pretrained(path, key, seconds, False, info)
