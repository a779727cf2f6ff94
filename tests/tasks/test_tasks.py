"""The tasks: the diffusion loss by hand, masked losses, parameter groups, evaluation."""

import numpy as np
import pytest
import torch
from torch import nn

from fedtier.data import ArrayDataset
from fedtier.errors import FedtierError
from fedtier.evaluate import evaluate_at_bits
from fedtier.models import build_model
from fedtier.quant import QuantSpec
from fedtier.state import StateLayout, all_of, keep_batchnorm_local
from fedtier.tasks import (
    AutoencoderTask,
    ClassificationTask,
    DiffusionTask,
    Groups,
    batch_len,
    qat,
    take,
)
from tests.conftest import TwoPart


def test_alpha_bar_is_the_closed_form_of_the_linear_schedule():
    task = DiffusionTask(steps=1000, beta_start=1e-4, beta_end=0.02)
    betas = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(task.alpha_bar.numpy(), np.cumprod(1 - betas), rtol=1e-6)
    assert task.alpha_bar[-1] == pytest.approx(4.04e-5, rel=1e-2)  # DDPM's ᾱ_T


def test_diffusion_loss_against_a_hand_computation():
    torch.manual_seed(0)
    model = build_model("denoiser-mlp", (1, 8, 8), 10, hidden=32, embed=8)
    task = DiffusionTask(steps=40, beta_start=1e-3, beta_end=0.05)
    x = torch.randn(5, 1, 8, 8)
    loss = task.loss(model, x, torch.Generator().manual_seed(3))

    g = torch.Generator().manual_seed(3)  # documented order: t [B], then ε [B, ...]
    t = torch.randint(0, 40, (5,), generator=g)
    eps = torch.randn(5, 1, 8, 8, generator=g)
    ab = np.cumprod(1 - np.linspace(1e-3, 0.05, 40))[t.numpy()]
    ab = torch.tensor(ab, dtype=torch.float32).view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x + (1 - ab).sqrt() * eps
    with torch.no_grad():
        eps_hat = model(x_t, t)
    expected = ((eps_hat - eps) ** 2).sum() / eps.numel()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-7)


def test_an_exact_noise_predictor_scores_zero():
    """A model that recovers ε exactly from x_t (it knows x) scores 0."""
    task = DiffusionTask(steps=10)
    x = torch.randn(4, 1, 8, 8)

    class Oracle(nn.Module):  # knows x, so recovers ε = (x_t − √ᾱ x) / √(1 − ᾱ)
        def forward(self, x_t, t):
            ab = task.alpha_bar[t].view(-1, 1, 1, 1)
            return (x_t - ab.sqrt() * x) / (1 - ab).sqrt()

    assert task.loss(Oracle(), x, torch.Generator()).item() < 1e-8


def _digits_like(n=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(
        torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g), 10, "toy"
    )


def test_diffusion_evaluation_is_deterministic_and_independent_of_the_batch_size():
    torch.manual_seed(0)
    model = build_model("denoiser-mlp", (1, 8, 8), 10, hidden=16, embed=8).eval()
    task, data = DiffusionTask(eval_seed=5), _digits_like()
    a = task.evaluate(model, data, 7)
    assert a == task.evaluate(model, data, 7)
    assert a["mse"] == pytest.approx(task.evaluate(model, data, 30)["mse"], rel=1e-6)
    assert a != DiffusionTask(eval_seed=6).evaluate(model, data, 7)


def test_evaluation_after_ptq_works_for_any_tasks_metrics():
    torch.manual_seed(0)
    model = build_model("denoiser-mlp", (1, 8, 8), 10, hidden=16, embed=8)
    layout = StateLayout.of(model)
    out = evaluate_at_bits(
        model, layout, layout.flatten(model), DiffusionTask(), _digits_like(), [32, 8, 2],
        QuantSpec(), 16,
    )  # fmt: skip
    assert set(out) == {"32", "8", "2"} and all(set(m) == {"mse"} for m in out.values())
    assert out["32"]["mse"] != out["2"]["mse"]


TASKS = {
    "classification": (ClassificationTask(10), "mlp", {"hidden": 16}),
    "qat classification": (qat(ClassificationTask(10), [8, 4], QuantSpec()), "mlp", {"hidden": 16}),
    "autoencoder": (AutoencoderTask(), "autoencoder", {"hidden": 16, "latent": 4}),
    "diffusion": (DiffusionTask(steps=30), "denoiser-mlp", {"hidden": 16, "embed": 8}),
    "qat diffusion": (
        qat(DiffusionTask(steps=30), [6], QuantSpec()),
        "denoiser-mlp",
        {"hidden": 16, "embed": 8},
    ),
}


@pytest.mark.parametrize("name", TASKS)
def test_masked_loss_equals_the_plain_loss_on_the_unmasked_rows(name):
    task, model_name, options = TASKS[name]
    torch.manual_seed(0)
    model = build_model(model_name, (1, 8, 8), 10, **options)
    data = _digits_like(9)
    batch = (data.x, data.y) if task.labelled else data.x
    real = take(batch, torch.arange(6))
    plain = task.loss(model, real, torch.Generator().manual_seed(4))

    masked = task.masked
    assert masked is not None
    g = torch.Generator().manual_seed(4)
    draws = () if masked.draw is None else masked.draw(real, g)
    # the real rows shuffled among three other samples (rows 6..8) with arbitrary draws,
    # masked out: real row i sits at position[i]
    padded = take(batch, torch.tensor([3, 0, 6, 1, 7, 2, 8, 4, 5]))
    position = torch.tensor([1, 3, 5, 0, 7, 8])
    mask = torch.zeros(9)
    mask[position] = 1.0
    pad_draws = []
    for d in draws:
        full = torch.randint(0, 30, (9, *d.shape[1:])).to(d.dtype)
        full[position] = d
        pad_draws.append(full)
    assert batch_len(padded) == 9
    value = masked.loss(model, padded, mask, tuple(pad_draws))
    torch.testing.assert_close(value, plain, rtol=1e-5, atol=1e-6)
    if masked.draw is not None:  # the masked draw consumed the generator as the loss did
        g_plain = torch.Generator().manual_seed(4)
        task.loss(model, real, g_plain)
        assert torch.equal(g.get_state(), g_plain.get_state())


def test_groups_filter_composes_with_fedbn():
    groups = Groups((("body", "body"), ("head", "head")), kept=frozenset({"head"}))
    model = TwoPart()
    groups.check(model)
    layout = StateLayout.of(model, all_of(groups.uploads, keep_batchnorm_local))
    uploaded = dict(zip(layout.names, layout.uploaded))
    assert uploaded == {
        "body.1.weight": True,
        "body.1.bias": True,
        "body.2.weight": False,  # FedBN
        "body.2.bias": False,
        "body.2.running_mean": False,
        "body.2.running_var": False,
        "head.weight": False,  # the task's kept group
        "head.bias": False,
    }


def test_groups_must_cover_the_model_and_match_something():
    model = TwoPart()
    with pytest.raises(FedtierError, match="'head.weight' is in none"):
        Groups((("body", "body"),)).check(model)
    with pytest.raises(FedtierError, match="'disc'"):
        Groups((("model", ""), ("disc", "discriminator"))).check(model)
    assert Groups((("all", ""), ("head", "head"))).group_of("head.bias") == "head"
    assert Groups((("all", ""), ("head", "head"))).group_of("headless.w") == "all"
