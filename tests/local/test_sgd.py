"""The one local-SGD loop: label-free batching, hooks, and the attackers sharing it."""

import torch
import torch.nn.functional as F
from torch import nn

from fedtier.attacks import train_adversarial
from fedtier.local.sgd import Hooks, local_sgd, train_client
from fedtier.metrics import reduce_values
from fedtier.tasks import AutoencoderTask, ClassificationTask, LocalConfig


def _model(seed=0, out=8):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, out))


def _hand_sgd(model, loss, xs, cfg, seed):
    """E epochs of SGD by hand: one torch.randperm per epoch, batches in order."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    steps = 0
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(xs[0]), generator=g)
        for i in range(0, len(perm), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            opt.zero_grad()
            loss(model, *(t[idx] for t in xs)).backward()
            opt.step()
            steps += 1
    return steps


def test_unlabelled_data_is_batched_without_labels():
    x = torch.randn(11, 1, 2, 4)
    cfg = LocalConfig(epochs=2, batch_size=4, lr=0.1, momentum=0.5)
    a = _model(out=8).append(nn.Unflatten(1, (1, 2, 4)))
    b = _model(out=8).append(nn.Unflatten(1, (1, 2, 4)))
    steps = train_client(a, AutoencoderTask(), x, cfg, torch.Generator().manual_seed(3))
    ref = _hand_sgd(b, lambda m, xb: F.mse_loss(m(xb), xb), (x,), cfg, 3)
    assert steps == ref == 6  # 2 epochs of ⌈11 / 4⌉ batches
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_the_attackers_train_with_the_honest_loop():
    x, y = torch.randn(10, 1, 2, 4), torch.randint(0, 3, (10,))
    cfg = LocalConfig(epochs=2, batch_size=3, lr=0.2, momentum=0.9)
    honest, attacker = _model(out=3), _model(out=3)
    train_client(honest, ClassificationTask(3), (x, y), cfg, torch.Generator().manual_seed(1))

    def ce(m, xb, yb):
        return F.cross_entropy(m(xb), yb)

    train_adversarial(attacker, ce, x, y, cfg, torch.Generator().manual_seed(1))
    for p, q in zip(honest.parameters(), attacker.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_hooks_run_in_their_documented_order():
    calls = []

    def perturb(params):
        calls.append("perturb")
        return lambda: calls.append("undo")

    hooks = Hooks(
        perturb=perturb,
        on_grad=lambda params: calls.append("grad" if params[0].grad is not None else "none"),
        after_step=lambda model: calls.append("step"),
    )

    def loss(model, batch, generator):
        calls.append("loss")
        return model(batch).sum()

    x = torch.randn(4, 1, 2, 4)
    local_sgd(_model(), loss, x, LocalConfig(1, 2, 0.1), torch.Generator(), hooks)
    assert calls == ["perturb", "loss", "undo", "grad", "step"] * 2


def test_metric_reductions():
    assert reduce_values("sum", [1.0, 2.0, 4.0]) == 7.0
    assert reduce_values("mean", [1.0, 2.0, 4.0]) == 7.0 / 3
    assert reduce_values("last", [1.0, 2.0, 4.0]) == 4.0


def test_local_adam_follows_adams_update_rule_by_hand():
    """train.optimizer = adam: two steps of Kingma & Ba's Algorithm 1 (bias-corrected
    moments, default betas), computed by hand on a least-squares loss."""
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    y = x @ torch.tensor([1.0, -2.0, 0.5])
    model = nn.Linear(3, 1, bias=False)
    nn.init.zeros_(model.weight)
    cfg = LocalConfig(epochs=2, batch_size=8, lr=0.1, weight_decay=0.0, optimizer="adam")

    def loss(m, batch, g):
        xb, yb = batch
        return F.mse_loss(m(xb).squeeze(1), yb)

    steps = local_sgd(model, loss, (x, y), cfg, torch.Generator().manual_seed(1))
    assert steps == 2  # one full batch per epoch: its order does not change the gradient
    w, m, v = torch.zeros(3), torch.zeros(3), torch.zeros(3)
    b1, b2, eps = 0.9, 0.999, 1e-8
    for t in (1, 2):
        grad = 2 * x.T @ (x @ w - y) / len(x)  # ∇ of the mean squared error
        m, v = b1 * m + (1 - b1) * grad, b2 * v + (1 - b2) * grad**2
        w = w - 0.1 * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
    torch.testing.assert_close(model.weight.detach().squeeze(0), w)
    # the first step moves every weight by ≈ lr, whatever its gradient's size (sign step)
    assert not torch.allclose(w, torch.zeros(3))


def test_an_unknown_local_optimizer_is_refused():
    import pytest

    with pytest.raises(ValueError, match="'sgd' or 'adam'"):
        local_sgd(
            _model(),
            lambda m, b, g: m(b).sum(),
            torch.randn(2, 8),
            LocalConfig(1, 2, 0.1, optimizer="lbfgs"),
            torch.Generator(),
        )
