"""Attacks as client behaviours (SPEC §3): quantization-activated attacks (QAFed's FQMA and
FQBD), Hong et al.'s quantization backdoor and degradation, and the survey's classics.

``build_attack`` turns ``cfg.attack`` into an :class:`Attack`; ``attack_executor`` wraps the
arm's executor so that the malicious clients follow it. ``with_asr`` adds the attack
success rate to the task's evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fedtier.attacks.baddiffusion import (
    baddiffusion_loss,
    load_pattern,
    patch_trigger,
    target_image,
)
from fedtier.attacks.client import (
    Attack,
    Transform,
    attack_executor,
    attack_stage,
    train_adversarial,
)
from fedtier.attacks.losses import (
    clean_loss,
    fqbd_fp32_loss,
    fqbd_loss,
    fqma_loss,
    hong_backdoor_loss,
    hong_degrade_loss,
    label_flip_loss,
    poison_loss,
)
from fedtier.attacks.triggers import Trigger
from fedtier.config import (
    Attacker,
    BadDiffusionAttack,
    ByzantineAttack,
    CellsSolver,
    DbaAttack,
    FqbdAttack,
    FqmaAttack,
    HongBackdoorAttack,
    HongDegradeAttack,
    LabelFlipAttack,
    Poisoning,
    ReplacementAttack,
    TrainedAttack,
)
from fedtier.data import ArrayDataset
from fedtier.errors import ConfigError
from fedtier.metrics import MetricSpec
from fedtier.quant import QuantSpec
from fedtier.seeding import numpy_rng
from fedtier.tasks import ClientTask, DiffusionTask, TaskWrapper

if TYPE_CHECKING:
    from fedtier.config import Config

__all__ = [
    "Attack",
    "KINDS",
    "Trigger",
    "attack_executor",
    "attack_stage",
    "baddiffusion_images",
    "build_attack",
    "malicious_clients",
    "measures_asr",
    "observation_key",
    "train_adversarial",
    "unwrap_diffusion",
    "with_asr",
]

BACKDOORS = ("fqbd", "hong-backdoor", "replacement", "dba")
AMPLIFIED = ("fqbd", "fqma", "replacement", "dba")  # γ = N/η_s unless attack.gamma is set
KINDS = (
    "none",
    *BACKDOORS,
    "fqma",
    "hong-degrade",
    "label-flip",
    "sign-flip",
    "gaussian",
    "scaled",
    "baddiffusion",
)
HONG_BITS = {"hong-backdoor": [8, 4], "hong-degrade": [8, 7, 6, 5]}


def malicious_clients(cfg: Config) -> frozenset[int]:
    """The malicious clients: ``attack.malicious_ids``, or a seeded draw of the configured
    fraction/count (none when ``attack.kind`` is ``none``)."""
    a, n = cfg.attack, cfg.topology.clients
    if not isinstance(a, Attacker):
        return frozenset()
    if a.malicious_ids is not None:
        return frozenset(a.malicious_ids)
    count = int(round(a.malicious * n)) if a.malicious < 1 else int(a.malicious)
    rng = numpy_rng(cfg.seed, "malicious")
    return frozenset(int(c) for c in rng.choice(n, size=count, replace=False))


def measures_asr(cfg: Config) -> bool:
    """Whether the arm's evaluation adds the attack success rate (:func:`with_asr`): for
    backdoor attacks, or when ``eval.asr`` asks for it."""
    return cfg.attack.kind in BACKDOORS or cfg.eval.asr


def observation_key(cfg: Config) -> tuple[Any, ...] | None:
    """What the arm's attack observes while it is silent (before ``attack.start_round``): the
    attacks that train on an objective watch every model their clients receive, to predict
    the target bits (:func:`fedtier.attacks.client.watch`: their pooling and candidate bits
    decide what they record); Byzantine attacks and BadDiffusion observe nothing (None).
    Until then every attack's clients train honestly, so arms that differ only in attacks
    of the same start round and malicious clients run the same rounds, and their attacks'
    states differ only by these observations (:func:`fedtier.experiment.shared_prefixes`)."""
    a = cfg.attack
    if not isinstance(a, TrainedAttack):
        return None
    return (a.pool, tuple(a.candidate_bits))


def make_trigger(cfg: Config, train: ArrayDataset) -> Trigger:
    t = cfg.trigger
    shape = train.input_shape
    if len(shape) != 3 or t.size > min(shape[-2:]):
        raise ConfigError("trigger.size", t.size, f"at most the image side {tuple(shape[-2:])}")
    if not 0 <= t.target < train.num_classes:
        raise ConfigError("trigger.target", t.target, f"a class in [0, {train.num_classes - 1}]")
    value = float(train.x.max()) if t.value is None else t.value
    return Trigger(t.size, t.position, value, t.target)


def build_attack(
    cfg: Config,
    trigger: Trigger,
    num_classes: int,
    gamma_auto: float,
    task: ClientTask | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> Attack:
    """The configured attack; ``gamma_auto`` = N / η_s (model replacement). BadDiffusion also
    needs the arm's ``task`` (its noise schedule) and the data's ``input_shape``."""
    a = cfg.attack
    assert isinstance(a, Attacker), "build_attack needs an attack (attack.kind is 'none')"
    if isinstance(a, BadDiffusionAttack):
        return build_baddiffusion(cfg, a, trigger, task, input_shape)
    spec = QuantSpec(cfg.quant.quantizer, cfg.quant.params)
    malicious = malicious_clients(cfg)
    trained = a if isinstance(a, TrainedAttack) else None
    gamma_set = trained.gamma if trained is not None else None
    gamma = gamma_set if gamma_set is not None else (gamma_auto if a.kind in AMPLIFIED else 1.0)
    bits = trained.bits if trained is not None else None
    if bits is None and a.kind in HONG_BITS:  # Hong et al. attack fixed bit sets, no prediction
        bits = HONG_BITS[a.kind]
    loss: Callable[[list[int], int], Any] | None = None
    transform: Transform | None = None
    frac = a.poison_fraction if isinstance(a, Poisoning) else 0.0
    if isinstance(a, FqbdAttack):
        lam = a.lam
        loss = lambda b, c: fqbd_loss(spec, b, lam, trigger, frac)  # noqa: E731
    elif isinstance(a, FqmaAttack):
        lam, alpha = a.lam, a.alpha
        loss = lambda b, c: fqma_loss(spec, b, lam, alpha)  # noqa: E731
    elif isinstance(a, HongBackdoorAttack):
        lam = a.lam
        loss = lambda b, c: hong_backdoor_loss(spec, b, lam, trigger, frac)  # noqa: E731
    elif isinstance(a, HongDegradeAttack):
        lam, alpha = a.lam, a.alpha
        loss = lambda b, c: hong_degrade_loss(spec, b, lam, alpha)  # noqa: E731
    elif isinstance(a, ReplacementAttack):
        loss = lambda b, c: poison_loss(trigger, frac)  # noqa: E731
    elif isinstance(a, LabelFlipAttack):
        loss = lambda b, c: label_flip_loss(num_classes)  # noqa: E731
    elif isinstance(a, DbaAttack):
        # DBA: attacker j (in id order) poisons with the j-th part of the trigger; the ASR is
        # measured with the full trigger
        rank = {c: i for i, c in enumerate(sorted(malicious))}
        parts = a.dba_parts
        loss = lambda b, c: poison_loss(trigger.with_part(rank[c], parts), frac)  # noqa: E731
    else:
        assert isinstance(a, ByzantineAttack)
        transform = byzantine(a.kind, a.scale)
    repair: Callable[[int], Any] | None = None
    cells = a if isinstance(a, CellsSolver) else CellsSolver()  # defaults when not FQBD/FQMA
    if cells.solver == "cells" and a.kind == "fqbd":
        repair = lambda c: fqbd_fp32_loss(trigger, frac)  # noqa: E731
    elif cells.solver == "cells" and a.kind == "fqma":
        repair = lambda c: clean_loss  # noqa: E731
    evade = a.evade if isinstance(a, FqbdAttack) else None
    # the trained attackers' own settings; Byzantine ones keep the Attack defaults
    own: dict[str, Any] = {}
    if trained is not None:
        own = {k: getattr(trained, k) for k in ("predict_k", "noise_sigma", "grad_norm", "pool")}
        own["candidate_bits"] = list(trained.candidate_bits)
    return Attack(
        kind=a.kind,
        malicious=malicious,
        start_round=a.start_round,
        gamma=gamma,
        loss=loss,
        transform=transform,
        bits=bits,
        spec=spec,
        repair=repair,
        cell_margin=cells.cell_margin,
        repair_lr=cells.repair_lr,
        stat_match=cells.stat_match,
        evade_kl=evade.kl if evade is not None else 0.0,
        evade_residuals=evade.residuals if evade is not None else 0.0,
        **own,
    )


def build_baddiffusion(
    cfg: Config,
    a: BadDiffusionAttack,
    trigger: Trigger,
    task: ClientTask | None,
    input_shape: tuple[int, ...] | None,
) -> Attack:
    """BadDiffusion's malicious devices: they train on :func:`baddiffusion_loss` over the
    task's noise schedule (no target-bit observation); their Δ is scaled by ``attack.gamma``
    when it is set (model replacement), else uploaded as trained."""
    diffusion = unwrap_diffusion(task)
    if diffusion is None or input_shape is None:
        raise ConfigError(
            "attack.kind", a.kind, "an attack on a diffusion model: set train.task: diffusion"
        )
    trig, target = baddiffusion_images(cfg, a, trigger, input_shape)
    alphas, alphas_cumprod = diffusion_schedule(diffusion)
    loss = baddiffusion_loss(trig, target, alphas, alphas_cumprod, a.poison_fraction, a.solver)
    return Attack(
        kind=a.kind,
        malicious=malicious_clients(cfg),
        start_round=a.start_round,
        gamma=a.gamma if a.gamma is not None else 1.0,
        task_loss=loss,
        amplify=a.gamma is not None,
        pool=a.pool,
    )


def baddiffusion_images(
    cfg: Config, a: BadDiffusionAttack, trigger: Trigger, shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(trigger r [C, H, W], target y [C, H, W]) of the attack, checked against the data's
    ``shape``: the trigger section's patch (added to x_T) or ``attack.trigger_file``; the
    named target image or ``attack.target_file``."""
    if a.trigger_file is not None:
        r = load_pattern("attack.trigger_file", a.trigger_file, shape)
    else:
        if len(shape) != 3 or trigger.size > min(shape[-2:]):
            raise ConfigError("trigger.size", trigger.size, f"at most the image side {shape}")
        r = patch_trigger(shape, trigger)
    if a.target_file is not None:
        y = load_pattern("attack.target_file", a.target_file, shape)
    else:
        y = target_image(a.target, shape)
    return r, y


def unwrap_diffusion(task: ClientTask | None) -> DiffusionTask | None:
    """The diffusion task under any wrappers (QAT), or None."""
    while task is not None and not isinstance(task, DiffusionTask):
        task = getattr(task, "task", None)
    return task


def diffusion_schedule(task: DiffusionTask) -> tuple[torch.Tensor, torch.Tensor]:
    """(α_t [T], ᾱ_t [T]) of the task's linear schedule (ᾱ is the task's own)."""
    betas = torch.linspace(task.beta_start, task.beta_end, task.steps, dtype=torch.float64)
    return (1.0 - betas).float(), task.alpha_bar


def byzantine(kind: str, scale: float) -> Transform:
    """Untargeted Byzantine updates from the client's honest Δ: ``sign-flip`` −scale·Δ,
    ``scaled`` scale·Δ, ``gaussian`` N(0, scale²) per coordinate."""
    if kind == "sign-flip":
        return lambda d, g: -scale * d
    if kind == "scaled":
        return lambda d, g: scale * d
    if kind == "gaussian":
        return lambda d, g: scale * torch.randn(d.shape, generator=g)
    raise ConfigError("attack.kind", kind, f"one of {list(KINDS)}")


ATTACK_SUCCESS = MetricSpec(
    "Attack success rate", "%", higher_is_better=False, scale=100.0, fmt=".1f"
)


@dataclass(frozen=True)
class BackdoorEval(TaskWrapper):
    """A task whose evaluation adds the attack success rate ``asr``: the fraction of
    triggered test inputs of a class other than the target that are classified as the
    target. Training is the wrapped task's; ``asr`` is tabulated per bit width after the
    wrapped task's own tables."""

    task: ClientTask
    trigger: Trigger

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: ArrayDataset, batch_size: int) -> dict[str, float]:
        out = self.task.evaluate(model, data, batch_size)
        out["asr"] = attack_success_rate(model, data, self.trigger, batch_size)
        return out

    @property
    def metrics(self) -> Mapping[str, MetricSpec]:
        return {**self.task.metrics, "asr": ATTACK_SUCCESS}

    @property
    def tables(self) -> tuple[str, ...]:
        return (*self.task.tables, "asr")


def attack_success_rate(
    model: nn.Module, data: ArrayDataset, trigger: Trigger, batch_size: int
) -> float:
    keep = data.y != trigger.target
    x = data.x[keep]
    device = next(model.parameters()).device
    hits = 0
    for i in range(0, len(x), batch_size):
        xb = trigger.stamp(x[i : i + batch_size]).to(device)
        hits += int((model(xb).argmax(1).cpu() == trigger.target).sum())
    return hits / max(1, len(x))


def with_asr(task: ClientTask, trigger: Trigger) -> ClientTask:
    return BackdoorEval(task, trigger)
