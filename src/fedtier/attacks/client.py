"""Malicious clients as an executor wrapper: honest clients train as usual, malicious ones
follow their attack (QAFed §3.2: silent phase, target-bit prediction, amplification,
adversarial noise training and the gradient-norm constraint)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fedtier.attacks.losses import Loss
from fedtier.local import LocalConfig
from fedtier.local.sgd import _has_batchnorm, client_generator
from fedtier.quant import QuantSpec, quantize_copy

if TYPE_CHECKING:
    from fedtier.rounds import ArmSetup

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
    bits: list[int] | None = None  # configured B'; None = predicted
    candidate_bits: list[int] = field(default_factory=lambda: [8, 6, 5, 4])
    predict_k: int = 2
    noise_sigma: float = 0.0
    grad_norm: float | None = None
    spec: QuantSpec = QuantSpec()
    # target-bit prediction: ΔAcc_b summed over the global models the attackers have seen
    drop_sum: dict[int, float] = field(default_factory=dict)
    seen: int = 0
    active_updates: int = 0
    amplify_mask: torch.Tensor | None = None  # [P] entries γ scales (parameters; None = all)
    # sample-weighted aggregation (fedavg): γ_i = γ · n̄ / (n_i · m), see :func:`replacement_factor`
    mean_size: float | None = None

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
        }


def attack_generator(seed: int, step: int, client: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(
        int(
            np.random.SeedSequence([seed, step, client, 0xA77]).generate_state(1, np.uint64)[0] >> 1
        )
    )
    return g


def attack_executor(base: Executor, attack: Attack) -> Executor:
    """Wrap ``base``: honest clients (and malicious ones in the silent phase) go through
    ``base``; active malicious clients produce their attack's delta. Row order is kept."""
    from fedtier.rounds import client_update

    def run(setup: ArmSetup, w: torch.Tensor, clients: list[int], step: int) -> torch.Tensor:
        kappa = setup.cfg.aggregate.edge_rounds
        active = step // kappa >= attack.start_round
        bad = [c for c in clients if active and c in attack.malicious]
        honest = [c for c in clients if c not in bad]
        rows: dict[int, torch.Tensor] = {}
        if honest:
            rows.update(zip(honest, base(setup, w, honest, step)))
        for c in bad:
            attack.active_updates += 1
            if attack.transform is not None:
                d = client_update(setup, w, c, step)
                rows[c] = attack.transform(d, attack_generator(setup.cfg.seed, step, c))
            else:
                n_c = float(setup.topology.num_samples[c])
                gamma = replacement_factor(attack, n_c, len(bad))
                rows[c] = amplify(malicious_update(setup, attack, w, c, step), attack, gamma)
        return torch.stack([rows[c] for c in clients])

    return run


def replacement_factor(attack: Attack, size: float, colluders: int) -> float:
    """γ for one malicious client. Unweighted aggregation (QAFed's rule): γ = N/η_s, eq. (16).
    Sample-weighted FedAvg gives client i the share n_i/Σn, not 1/N_s, so the same model
    replacement needs γ_i = N_s · n̄ / n_i (n̄ the mean client size, which the attackers are
    assumed to know, as Bagdasaryan et al. assume n/η), shared among the ``colluders`` that
    attack in the same edge aggregation so that together they replace the model once."""
    if attack.mean_size is None:
        return attack.gamma
    return attack.gamma * attack.mean_size / (size * max(colluders, 1))


def amplify(delta: torch.Tensor, attack: Attack, gamma: float) -> torch.Tensor:
    """Model replacement, eq. (16)–(17): Δ ← γ·Δ on the model's parameters. BatchNorm running
    statistics are not scaled (γ·Δvar would drive variances negative)."""
    if attack.amplify_mask is None:
        return gamma * delta
    return torch.where(attack.amplify_mask, gamma * delta, delta)


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
    setup: ArmSetup, attack: Attack, w: torch.Tensor, client: int, step: int
) -> torch.Tensor:
    """Δ of one malicious client: local training on its attack objective from w."""
    assert attack.loss is not None
    cfg = setup.cfg
    x, y = setup.client_data(client)
    observe(setup, attack, w, x, y)
    bits = attack.bits if attack.bits is not None else attack.predicted_bits()
    setup.layout.load(setup.model, w)
    tr, a = cfg.train, cfg.attack
    local = LocalConfig(
        a.epochs if a.epochs is not None else tr.epochs,
        tr.batch_size,
        a.lr if a.lr is not None else tr.lr,
        a.momentum if a.momentum is not None else tr.momentum,
        tr.weight_decay,
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
    new = setup.layout.flatten(setup.model)
    return torch.where(setup.upload_mask, new - w, torch.zeros_like(new))


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
) -> int:
    """Local SGD on ``loss_fn`` with QAFed's evasion terms.

    Adversarial noise training, eq. (18)–(19): each step evaluates the loss at
    w' = w + σ·ε, ε ~ N(0, I), and applies that gradient to w (so the attack survives the
    server's noise). Gradient-norm constraint, eq. (20): g ← g · min(1, τ / ‖g‖₂).
    Same batch order as honest training (:func:`fedtier.local.train_client`).

    BatchNorm stays on the received running statistics (eval mode) and they are not
    updated: the attacker optimises the function the devices will run, and its upload
    changes only the parameters, so model replacement (γ scales parameters only) replaces
    a model whose weights and statistics belong together.
    """
    model.train()
    for m in model.modules():  # BatchNorm frozen: see the docstring
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    n, steps = len(y), 0
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            if len(idx) < 2 and n >= 2 and _has_batchnorm(model):
                continue
            xb, yb = x[idx].to(device), y[idx].to(device)
            noise = []
            if noise_sigma > 0:
                with torch.no_grad():
                    for p in params:
                        e = noise_sigma * torch.randn(p.shape, generator=noise_generator).to(device)
                        p.add_(e)
                        noise.append(e)
            opt.zero_grad(set_to_none=True)
            loss_fn(model, xb, yb).backward()
            if noise:
                with torch.no_grad():
                    for p, e in zip(params, noise):
                        p.sub_(e)
            if grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, grad_norm)
            opt.step()
            steps += 1
    return steps
