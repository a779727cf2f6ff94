"""qat(task, bits, spec): QAFed eq. 8 against a hand computation with quantized copies."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fedtier.models import build_model
from fedtier.quant import QuantSpec, paper_quantize
from fedtier.quant.bnstats import add_bit_stats
from fedtier.tasks import ClassificationTask, DiffusionTask, qat

SPEC = QuantSpec("paper", "all")
BITS = (8, 4)


def _reference_eq8(model, x, y, bits):
    """F(w) + Σ_b F(Q_b(w)) and its gradient under the straight-through estimator, by hand:
    each quantized term is evaluated on detached quantized tensors (paper_quantize directly),
    and its gradient with respect to those tensors is the STE gradient for w."""
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    total = F.cross_entropy(functional_call(model, {**params, **buffers}, (x,)), y)
    grads = dict(zip(params, torch.autograd.grad(total, list(params.values()))))
    for b in bits:
        q = {n: paper_quantize(p.detach(), b).requires_grad_() for n, p in params.items()}
        stats = {}
        for name in buffers:
            stem, _, stat = name.rpartition(".")
            per_bit = f"{stem}.{stat}_q{b}" if stem else f"{stat}_q{b}"
            if stat in ("running_mean", "running_var") and per_bit in buffers:
                stats[name] = buffers[per_bit]
        term = F.cross_entropy(functional_call(model, {**q, **buffers, **stats}, (x,)), y)
        total = total + term
        for n, g in zip(q, torch.autograd.grad(term, list(q.values()))):
            grads[n] = grads[n] + g
    return total, grads


@pytest.mark.parametrize("name", ["mlp", "cnn-bn"])
def test_qat_loss_and_gradient_equal_eq8_by_hand(name):
    torch.manual_seed(0)
    model = build_model(
        name, (1, 8, 8), 10, **({"width": 0.5, "hidden": 16} if name != "mlp" else {})
    )
    add_bit_stats(model, BITS)
    x, y = torch.randn(12, 1, 8, 8), torch.randint(0, 10, (12,))
    ref_model = copy.deepcopy(model)
    ref_loss, ref_grads = _reference_eq8(ref_model, x, y, BITS)

    task = qat(ClassificationTask(10), BITS, SPEC)
    model.train()
    model.zero_grad()
    loss = task.loss(model, (x, y), torch.Generator())
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-5, atol=1e-7)


def test_each_precision_updates_its_own_batchnorm_statistics():
    torch.manual_seed(0)
    model = build_model("cnn-bn", (1, 8, 8), 10, width=0.5, hidden=16)
    add_bit_stats(model, BITS)
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x, y = torch.randn(12, 1, 8, 8), torch.randint(0, 10, (12,))
    model.train()
    qat(ClassificationTask(10), [4], SPEC).loss(model, (x, y), torch.Generator())
    assert not torch.equal(bn.running_mean, before["running_mean"])  # the fp32 pass
    assert not torch.equal(bn.running_mean_q4, before["running_mean_q4"])  # the 4-bit pass
    assert not torch.equal(bn.running_mean_q4, bn.running_mean)  # different activations
    torch.testing.assert_close(bn.running_mean_q8, before["running_mean_q8"], rtol=0, atol=0)


def test_qat_of_a_denoiser_gives_every_term_the_same_draws():
    """A multi-input model (x_t, t) under QAT: the terms see one draw of (t, ε), the generator
    ends as after one term, and the loss is Σ_b of the diffusion loss at Q_b(w) by hand."""
    torch.manual_seed(0)
    model = build_model("denoiser-mlp", (1, 8, 8), 10, hidden=32, embed=8)
    task = DiffusionTask(steps=50)
    x = torch.randn(6, 1, 8, 8)
    g = torch.Generator().manual_seed(7)
    loss = qat(task, BITS, SPEC).loss(model, x, g)

    ref_g = torch.Generator().manual_seed(7)
    t = torch.randint(0, 50, (6,), generator=ref_g)
    eps = torch.randn(x.shape, generator=ref_g)
    assert torch.equal(g.get_state(), ref_g.get_state())  # as after one term
    ab = task.alpha_bar[t].view(-1, 1, 1, 1)
    xt = ab.sqrt() * x + (1 - ab).sqrt() * eps
    expected = F.mse_loss(model(xt, t), eps)
    for b in BITS:
        q = {n: paper_quantize(p.detach(), b) for n, p in model.named_parameters()}
        expected = expected + F.mse_loss(functional_call(model, q, (xt, t)), eps)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)


def test_qat_drops_full_precision_and_keeps_the_inner_task_declarations():
    task = qat(ClassificationTask(3), [32, 8], SPEC)
    assert task.bits == (8,)
    assert task.headline == "accuracy" and task.tables == ("accuracy",)
    assert not task.plain_cross_entropy and ClassificationTask(3).plain_cross_entropy
    assert set(task.metrics) == {"accuracy", "class_0", "class_1", "class_2"}
