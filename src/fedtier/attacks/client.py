"""Malicious clients, in two parts (QAFed §3.2: silent phase, target-bit prediction,
amplification, adversarial noise training and the gradient-norm constraint):

* an executor decorator (:func:`attack_executor`): honest clients train as usual, active
  malicious clients with a training objective (FQBD, FQMA, Hong et al., poisoning) train on
  it; every attacker with an objective observes the models it receives (target-bit
  prediction);
* an upload stage acting on the malicious rows (:func:`attack_stage`, first in the upload
  chain): model replacement (γ, eq. 16–17) of the trained attack deltas, or a Byzantine
  transform (sign flip, scaling, Gaussian) of the attacker's honest update.

Neither imports the round loop.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fedtier.attacks.cells import consistent_outputs, matching_statistics, rounding_cells
from fedtier.attacks.losses import Loss
from fedtier.config import TrainedAttack
from fedtier.local import LocalConfig
from fedtier.local.sgd import Hooks, client_generator, local_sgd
from fedtier.metrics import MetricSpec, declare_stage_metrics
from fedtier.quant import QuantSpec, quantize_copy
from fedtier.seeding import torch_generator
from fedtier.tasks import Batch, client_batch
from fedtier.tasks.base import Loss as TaskLoss

if TYPE_CHECKING:
    from fedtier.local.arm import ArmSetup
    from fedtier.upload import Stage, UploadContext

declare_stage_metrics({"malicious": MetricSpec("Malicious uploads", reduce="sum")})

Executor = Callable[["ArmSetup", torch.Tensor, list[int], int], torch.Tensor]
# (honest delta [P], generator) -> malicious delta [P]
Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass
class Attack:
    """One attack, shared by its colluding malicious clients."""

    kind: str
    malicious: frozenset[int]
    start_round: int
    gamma: float  # amplification applied to the malicious delta (eq. 16–17)
    loss: Callable[[list[int], int], Loss] | None = None  # (B', client) → training objective
    transform: Transform | None = None  # Byzantine: applied to the honest delta
    # a task-shaped objective (model, batch, generator) → loss (BadDiffusion); trained
    # without target-bit observation
    task_loss: TaskLoss | None = None
    amplify: bool = True  # False: the trained Δ is uploaded as is (no model replacement)
    bits: list[int] | None = None  # configured B'; None = predicted
    candidate_bits: list[int] = field(default_factory=lambda: [8, 6, 5, 4])
    predict_k: int = 2
    noise_sigma: float = 0.0
    grad_norm: float | None = None
    spec: QuantSpec = QuantSpec()
    # target-bit prediction: ΔAcc_b summed over the observations of every model the malicious
    # clients received, from round 0 (silent phase included); seen = number of observations
    drop_sum: dict[int, float] = field(default_factory=dict)
    seen: int = 0
    watched: tuple[int, torch.Tensor] | None = None  # pool: (step, w) last observed
    active_updates: int = 0
    amplify_mask: torch.Tensor | None = None  # [P] entries γ scales (parameters; None = all)
    # sample-weighted aggregation (fedavg): γ_i = γ · n̄ / (n_i · m), see :func:`replacement_factor`
    mean_size: float | None = None
    # cells solver (attacks/cells.py): client → the fp32 term of the objective, repaired
    # inside the rounding cells of min(B'); None = the STE solver alone
    repair: Callable[[int], Loss] | None = None
    cell_margin: float = 0.25
    repair_lr: float = 0.01
    stat_match: float = 1.0  # weight of the BatchNorm statistics term of the repair
    repair_flips: int = 0  # entries restored after a repair (float ties on a cell boundary)
    # an attacker that knows qcheck (config ScreenEvasion): the repair also minimises the
    # screen's statistics, KL(p_w ‖ p_{Q_b(w)}) with this weight, and the residuals' distance
    # from uniform, moving them this fraction of the way per step (cells.Cells.spread)
    evade_kl: float = 0.0
    evade_residuals: float = 0.0
    # collusion: the malicious clients pool their data and upload one shared model per round
    pool: bool = False
    shared: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (step, w, Δ) of the round

    # what changes during a run (saved with every checkpoint, fedtier.rounds.RunState)
    STATE_FIELDS = ("drop_sum", "seen", "active_updates", "repair_flips", "shared", "watched")

    def state_dict(self) -> dict[str, Any]:
        """The attack's run state (observations, counters, the colluders' shared model)."""
        return {k: copy.deepcopy(getattr(self, k)) for k in self.STATE_FIELDS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in self.STATE_FIELDS:
            setattr(self, k, copy.deepcopy(state[k]))

    def predicted_bits(self) -> list[int]:
        """B': the k candidates whose mean ΔAcc_b = Acc(Q_b(w)) − Acc(w) is largest (smallest
        drop; QAT-trained bits betray themselves by not losing accuracy). Ties → lower bits."""
        if not self.seen:
            return []
        mean = {b: self.drop_sum[b] / self.seen for b in self.candidate_bits}
        order = sorted(self.candidate_bits, key=lambda b: (-round(mean[b], 4), b))
        return sorted(order[: self.predict_k], reverse=True)

    def summary(self, target_bits: list[int]) -> dict[str, Any]:
        predicted = self.predicted_bits()
        b = sorted((x for x in target_bits if x < 32), reverse=True)
        return {
            "kind": self.kind,
            "malicious": sorted(self.malicious),
            "gamma": self.gamma,
            "attacked_bits": self.bits if self.bits is not None else predicted,
            "predicted_bits": predicted,
            "target_bits": b,
            "prediction_correct": predicted == b,
            "mean_acc_drop": {
                str(k): self.drop_sum[k] / self.seen for k in self.candidate_bits if self.seen
            },
            "malicious_updates": self.active_updates,
            "solver": "cells" if self.repair is not None else "ste",
            "evade": {"kl": self.evade_kl, "residuals": self.evade_residuals},
        }


def attack_generator(seed: int, step: int, client: int) -> torch.Generator:
    return torch_generator(seed, "attack", step, client)


def attack_executor(base: Executor, attack: Attack) -> Executor:
    """Wrap ``base``: honest clients, malicious ones in the silent phase and Byzantine
    attackers (whose honest update :func:`attack_stage` transforms) go through ``base``;
    active malicious clients with a training objective produce their attack's delta, not yet
    amplified (the stage amplifies it). Row order is kept.

    Attacks with a training objective also observe every model their malicious clients
    receive, from round 0, silent phase included (:func:`watch`), so the target bits B' they
    attack with at ``start_round`` are predicted from the silent phase's global models
    (QAFed §3.2)."""

    def run(setup: ArmSetup, w: torch.Tensor, clients: list[int], step: int) -> torch.Tensor:
        if attack.loss is None and attack.task_loss is None:  # Byzantine: honest training
            return base(setup, w, clients, step)
        bad = [c for c in clients if is_active(setup, attack, step) and c in attack.malicious]
        honest = [c for c in clients if c not in bad]
        rows: dict[int, torch.Tensor] = {}
        # an executor with worker processes trains the honest clients there while this
        # process observes and trains the attackers (the same computations either way)
        submit = getattr(base, "submit", None)
        pending = None
        if honest and submit is not None:
            pending = submit(setup, w, honest, step)
        elif honest:
            rows.update(zip(honest, base(setup, w, honest, step)))
        if attack.loss is not None:  # target-bit prediction (quantization attacks)
            watch(setup, attack, w, [c for c in clients if c in attack.malicious], step)
        for c in bad:
            rows[c] = colluding_update(setup, attack, w, c, step)
        if pending is not None:
            rows.update(zip(honest, pending()))
        return torch.stack([rows[c] for c in clients])

    return run


def is_active(setup: ArmSetup, attack: Attack, step: int) -> bool:
    """Whether edge step ``step`` is past the silent phase (its cloud round ≥ start_round)."""
    return step // setup.cfg.aggregate.edge_rounds >= attack.start_round


def attack_stage(setup: ArmSetup, attack: Attack) -> Stage:
    """The upload stage of the attack, acting on the rows of the active malicious clients
    (first in the upload chain, so clipping, noise and codecs see what the attackers send):
    a Byzantine transform of the honest update (randomness keyed (seed, "attack", step,
    client)), or model replacement, Δ ← γ_i·Δ (eq. 16–17, :func:`replacement_factor`)."""

    def stage(deltas: torch.Tensor, ctx: UploadContext) -> tuple[torch.Tensor, dict[str, float]]:
        rows = [i for i, c in enumerate(ctx.clients) if c in attack.malicious]
        if not rows or not is_active(setup, attack, ctx.round):
            return deltas, {"malicious": 0.0}
        out = deltas.clone()
        colluders = round_colluders(setup, attack, ctx.round, len(rows))
        for i in rows:
            c = ctx.clients[i]
            attack.active_updates += 1
            if attack.transform is not None:
                out[i] = attack.transform(deltas[i], attack_generator(ctx.seed, ctx.round, c))
            elif attack.amplify:
                gamma = replacement_factor(attack, float(ctx.num_samples[i]), colluders)
                out[i] = amplify(deltas[i], attack, gamma)
        return out, {"malicious": float(len(rows))}

    return stage


def round_colluders(setup: ArmSetup, attack: Attack, step: int, here: int) -> int:
    """How many malicious clients upload in this synchronous round, over all edges (the
    colluders know each other, and share the model replacement among them); ``here`` (those of
    this call) for asynchronous schedules and κ > 1 edge rounds, whose calls are not rounds."""
    from fedtier.local.arm import round_plan

    plan = round_plan(setup, step) if setup.cfg.aggregate.edge_rounds == 1 else None
    if plan is None:
        return here
    return max(here, sum(c in attack.malicious for c in plan.clients))


def colluding_update(
    setup: ArmSetup, attack: Attack, w: torch.Tensor, client: int, step: int
) -> torch.Tensor:
    """Δ of one active malicious client. With ``attack.pool`` the colluders train one model per
    round, from w, on the union of their data (computed by the first of them to upload and
    reused by the others), so that model replacement delivers that one model rather than an
    average of several (which would undo a cells repair); otherwise each trains on its own."""
    if not attack.pool:
        return malicious_update(setup, attack, w, client, step)
    if attack.shared is not None and attack.shared[0] == step and torch.equal(attack.shared[1], w):
        return attack.shared[2]
    delta = malicious_update(
        setup, attack, w, min(attack.malicious), step, data=pooled_data(setup, attack)
    )
    attack.shared = (step, w.clone(), delta)
    return delta


def replacement_factor(attack: Attack, size: float, colluders: int) -> float:
    """γ for one malicious client, shared among the ``colluders`` that upload in the same round
    so that together they replace the model once. Unweighted aggregation (QAFed's rule):
    γ = N/η_s, eq. (16), for one attacker. Sample-weighted FedAvg gives client i the share
    n_i/Σn, not 1/N_s, so the same model replacement needs γ_i = N_s · n̄ / n_i (n̄ the mean
    client size, which the attackers are assumed to know, as Bagdasaryan et al. assume n/η)."""
    share = attack.gamma / max(colluders, 1)
    if attack.mean_size is None:
        return share
    return share * attack.mean_size / size


def amplify(delta: torch.Tensor, attack: Attack, gamma: float) -> torch.Tensor:
    """Model replacement, eq. (16)–(17): Δ ← γ·Δ on the model's parameters. BatchNorm running
    statistics are not scaled (γ·Δvar would drive variances negative)."""
    if attack.amplify_mask is None:
        return gamma * delta
    return torch.where(attack.amplify_mask, gamma * delta, delta)


def watch(
    setup: ArmSetup, attack: Attack, w: torch.Tensor, malicious: list[int], step: int
) -> None:
    """Target-bit prediction's observations of the model w that the ``malicious`` clients of
    one executor call received (the global model; with κ > 1 edge rounds, their edge's model),
    silent or active: one :func:`observe` per client on its own data, or with ``attack.pool``
    one per received model on the colluders' pooled data."""
    if not malicious:
        return
    if not attack.pool:
        for c in malicious:
            observe(setup, attack, w, *setup.client_data(c))
        return
    if (
        attack.watched is not None
        and attack.watched[0] == step
        and torch.equal(attack.watched[1], w)
    ):
        return
    x, y = pooled_data(setup, attack)
    observe(setup, attack, w, x, y)
    attack.watched = (step, w.clone())


def pooled_data(setup: ArmSetup, attack: Attack) -> tuple[torch.Tensor, torch.Tensor]:
    """The colluders' data, concatenated in client-id order."""
    data = [setup.client_data(c) for c in sorted(attack.malicious)]
    return torch.cat([d[0] for d in data]), torch.cat([d[1] for d in data])


def observe(
    setup: ArmSetup, attack: Attack, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor
) -> None:
    """Target-bit prediction, one observation: ΔAcc_b of the received global model on the
    attacker's own clean data for every candidate b."""
    setup.layout.load(setup.model, w)
    setup.model.eval()
    with torch.no_grad():
        base = _accuracy(setup.model, x, y)
        for b in attack.candidate_bits:
            acc = _accuracy(quantize_copy(setup.model, attack.spec, b).eval(), x, y)
            attack.drop_sum[b] = attack.drop_sum.get(b, 0.0) + acc - base
    attack.seen += 1


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    device = next(model.parameters()).device
    return float((model(x.to(device)).argmax(1).cpu() == y).float().mean())


def malicious_update(
    setup: ArmSetup,
    attack: Attack,
    w: torch.Tensor,
    client: int,
    step: int,
    data: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Δ of one malicious client: local training on its attack objective from w, on its own
    data (or ``data``, the colluders' pooled data), against the configured B' or the one
    predicted from the observations so far (w's included: :func:`watch` runs first)."""
    if attack.task_loss is not None:
        return task_objective_update(setup, attack.task_loss, w, client, step, data)
    assert attack.loss is not None
    cfg = setup.cfg
    x, y = setup.client_data(client) if data is None else data
    bits = attack.bits if attack.bits is not None else attack.predicted_bits()
    setup.layout.load(setup.model, w)
    tr, a = cfg.train, cfg.attack
    assert isinstance(a, TrainedAttack)
    local = LocalConfig(
        a.epochs if a.epochs is not None else tr.epochs,
        tr.batch_size,
        a.lr if a.lr is not None else tr.lr,
        a.momentum if a.momentum is not None else tr.momentum,
        tr.weight_decay,
        optimizer=tr.optimizer,
    )
    train_adversarial(
        setup.model,
        attack.loss(bits, client),
        x,
        y,
        local,
        client_generator(cfg.seed, step, client),
        attack.noise_sigma,
        attack.grad_norm,
        attack_generator(cfg.seed, step, client),
    )
    if attack.repair is not None and bits:
        repair_in_cells(
            setup.model,
            attack,
            attack.repair(client),
            x,
            y,
            local,
            torch_generator(cfg.seed, "repair", step, client),  # its own stream
            min(bits),
            attacked=bits,
            anchor=setup.layout.views(w) if attack.evade_kl > 0 else None,
            scales=[1.0, float(landing_edges(setup, step))],
        )
    new = setup.layout.flatten(setup.model)
    return torch.where(setup.upload_mask, new - w, torch.zeros_like(new))


def landing_edges(setup: ArmSetup, step: int) -> int:
    """E, the edges of the synchronous round of edge step ``step`` (1 when unplanned): the
    screen also scores an upload at its edge share, where an upload amplified for E edges
    puts the model w + E·(w_att − w) (defenses/qcheck.py, landing_scales)."""
    from fedtier.local.arm import round_plan

    plan = round_plan(setup, step)
    return 1 if plan is None else len(plan.edges)


def task_objective_update(
    setup: ArmSetup,
    loss: TaskLoss,
    w: torch.Tensor,
    client: int,
    step: int,
    data: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Δ of a malicious client whose objective is task-shaped (BadDiffusion): the honest
    clients' local SGD (:func:`fedtier.local.sgd.local_sgd`, same batch order and stream) on
    ``loss`` over its own data, with the attack's epochs and learning rate when set."""
    cfg, a = setup.cfg, setup.cfg.attack
    x, y = setup.client_data(client) if data is None else data
    setup.layout.load(setup.model, w)
    tr = cfg.train
    epochs, lr = getattr(a, "epochs", None), getattr(a, "lr", None)
    local = LocalConfig(
        epochs if epochs is not None else tr.epochs,
        tr.batch_size,
        lr if lr is not None else tr.lr,
        tr.momentum,
        tr.weight_decay,
        optimizer=tr.optimizer,
    )
    batch = client_batch(setup.task, x, y)
    local_sgd(setup.model, loss, batch, local, client_generator(cfg.seed, step, client))
    new = setup.layout.flatten(setup.model)
    return torch.where(setup.upload_mask, new - w, torch.zeros_like(new))


def repair_in_cells(
    model: nn.Module,
    attack: Attack,
    loss_fn: Loss,
    x: torch.Tensor,
    y: torch.Tensor,
    local: LocalConfig,
    generator: torch.Generator,
    bits: int,
    attacked: list[int] | None = None,
    anchor: dict[str, torch.Tensor] | None = None,
    scales: list[float] | None = None,
) -> None:
    """The cells solver's second phase (:mod:`fedtier.attacks.cells`): projected SGD on the
    objective's fp32 term over the weights whose ``bits``-bit deployment stays the one just
    trained. Only the quantized tensors move (biases and BatchNorm parameters, which the
    deployed model shares with fp32, stay), with the same epochs and batch size as the first
    phase, a fresh batch order (``generator``), ``attack.repair_lr`` and momentum 0.9.

    An attacker that knows the screen (``attack.evade_*``) also pulls fp32's outputs toward
    the deployed ones at every width of ``attacked`` (default: ``bits``), for the models
    ``anchor`` + k·(w − ``anchor``), k in ``scales`` (default [1]; anchor = the received
    model), and, after each
    projection, its rounding residuals toward the uniform law; the last step puts them on it."""
    cells = rounding_cells(model, attack.spec, bits, attack.cell_margin)
    if attack.stat_match > 0:
        loss_fn = matching_statistics(loss_fn, attack.spec, bits, attack.stat_match)
    if attack.evade_kl > 0:
        loss_fn = consistent_outputs(
            loss_fn, attack.spec, attacked or [bits], attack.evade_kl, anchor, scales or [1.0]
        )

    def project(m: nn.Module) -> None:
        cells.project(m)
        cells.spread(m, attack.evade_residuals)  # no-op unless the attacker evades

    cells.project(model)
    frozen = [p for n, p in model.named_parameters() if n not in cells.lo and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        train_adversarial(
            model,
            loss_fn,
            x,
            y,
            LocalConfig(local.epochs, local.batch_size, attack.repair_lr, 0.9, 0.0),
            generator,
            grad_norm=attack.grad_norm,
            project=project,
        )
    finally:
        for p in frozen:
            p.requires_grad_(True)
    if attack.evade_residuals > 0:
        cells.spread(model, 1.0)
    attack.repair_flips += cells.restore_flips(model)


def train_adversarial(
    model: nn.Module,
    loss_fn: Loss,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: LocalConfig,
    generator: torch.Generator,
    noise_sigma: float = 0.0,
    grad_norm: float | None = None,
    noise_generator: torch.Generator | None = None,
    project: Callable[[nn.Module], None] | None = None,
) -> int:
    """Local SGD on ``loss_fn`` with QAFed's evasion terms, as hooks of the one local-SGD
    loop (:func:`fedtier.local.sgd.local_sgd`, the honest clients' loop and batch order).

    Adversarial noise training, eq. (18)–(19): each step evaluates the loss at
    w' = w + σ·ε, ε ~ N(0, I), and applies that gradient to w (so the attack survives the
    server's noise). Gradient-norm constraint, eq. (20): g ← g · min(1, τ / ‖g‖₂).
    ``project`` (the cells solver's constraint) is applied to the model after every step.

    BatchNorm stays on the received running statistics (eval mode) and they are not
    updated: the attacker optimises the function the devices will run, and its upload
    changes only the parameters, so model replacement (γ scales parameters only) replaces
    a model whose weights and statistics belong together.
    """
    hooks = Hooks(
        perturb=adversarial_noise(noise_sigma, noise_generator) if noise_sigma > 0 else None,
        on_grad=gradient_norm_bound(grad_norm) if grad_norm is not None else None,
        after_step=project,
        freeze_batchnorm=True,
    )
    return local_sgd(model, supervised(loss_fn), (x, y), cfg, generator, hooks)


def supervised(loss_fn: Loss) -> TaskLoss:
    """An attack objective ``(model, x, y)`` as a task loss ``(model, (x, y), generator)``
    (the attack objectives draw nothing)."""

    def loss(model: nn.Module, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        assert isinstance(batch, tuple)
        x, y = batch
        return loss_fn(model, x, y)

    return loss


def adversarial_noise(
    sigma: float, generator: torch.Generator | None
) -> Callable[[Sequence[torch.Tensor]], Callable[[], None]]:
    """Eq. (18)–(19) as a :class:`Hooks` ``perturb``: add σ·ε (ε ~ N(0, I) from
    ``generator``) to every trained parameter; the returned undo removes it again."""

    def perturb(params: Sequence[torch.Tensor]) -> Callable[[], None]:
        noise = []
        with torch.no_grad():
            for p in params:
                e = sigma * torch.randn(p.shape, generator=generator).to(p.device)
                p.add_(e)
                noise.append(e)

        def undo() -> None:
            with torch.no_grad():
                for p, e in zip(params, noise):
                    p.sub_(e)

        return undo

    return perturb


def gradient_norm_bound(tau: float) -> Callable[[Sequence[torch.Tensor]], None]:
    """Eq. (20) as a :class:`Hooks` ``on_grad``: g ← g · min(1, τ / ‖g‖₂) over all trained
    parameters (``torch.nn.utils.clip_grad_norm_``)."""

    def clip(params: Sequence[torch.Tensor]) -> None:
        torch.nn.utils.clip_grad_norm_(params, tau)

    return clip
