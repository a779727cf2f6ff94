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
