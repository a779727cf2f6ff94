"""Gradient inversion (fedtier.privacy.inversion): PSNR, SSIM and TV against closed forms,
the one-step update against softmax regression's closed-form gradient, iDLG's label, and the
attack itself: it recovers a digit from an fp32 one-step upload of a small MLP and fails when
the upload is drowned in noise."""

import math

import pytest
import torch
from torch import nn

from fedtier.data import load_dataset
from fedtier.models import build_model
from fedtier.privacy.inversion import (
    infer_label,
    invert,
    match_images,
    psnr,
    sgd_update,
    ssim,
    total_variation,
)


def test_psnr_closed_form():
    x = torch.zeros(1, 4, 4)
    assert psnr(x + 0.1, x) == pytest.approx(20.0)  # MSE 0.01, range 1
    assert psnr(x + 0.1, x, data_range=2.0) == pytest.approx(10 * math.log10(4 / 0.01))
    y = torch.tensor([0.0, 0.5, 1.0, 0.25])
    z = torch.tensor([0.5, 0.5, 0.0, 0.25])  # squared errors 0.25, 0, 1, 0 → MSE 0.3125
    assert psnr(y, z) == pytest.approx(10 * math.log10(1 / 0.3125))
    assert psnr(y, y) == math.inf


def test_ssim_of_constant_images_is_the_luminance_term():
    # σ_x = σ_y = σ_xy = 0: SSIM = (2ab + C1) / (a² + b² + C1), C1 = (0.01 L)²
    a, b, c1 = 0.2, 0.6, 1e-4
    got = ssim(torch.full((1, 16, 16), a), torch.full((1, 16, 16), b))
    assert got == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-6)
    img = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert ssim(img, img) == pytest.approx(1.0)
    assert ssim(img, 1 - img) < 0  # anticorrelated structure


def test_total_variation_by_hand():
    x = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]]])
    # vertical |2 − 0|, |4 − 1| → 2.5; horizontal |1 − 0|, |4 − 2| → 1.5
    assert float(total_variation(x)) == pytest.approx(4.0)


def test_sgd_update_is_softmax_regressions_gradient_step():
    torch.manual_seed(0)
    model = build_model("mlp", (1, 3, 3), 4, layers=[])  # logits = W x + b
    x, y, lr = torch.randn(1, 1, 3, 3), torch.tensor([2]), 0.3
    names = [n for n, _ in model.named_parameters()]
    got = sgd_update(model, x, y, names, lr)
    lin = next(m for m in model.modules() if isinstance(m, nn.Linear))
    with torch.no_grad():
        p = torch.softmax(lin(x.reshape(1, -1)), 1)[0]
    e = p - nn.functional.one_hot(y, 4)[0]  # ∂ℓ/∂logits
    want = torch.cat([(-lr * torch.outer(e, x.reshape(-1))).reshape(-1), -lr * e])
    assert torch.allclose(got, want, atol=1e-6)


def test_infer_label_reads_the_true_class_of_one_image():
    train, _ = load_dataset("digits", None, seed=0)
    torch.manual_seed(1)
    model = build_model("mlp", train.input_shape, 10, hidden=16)
    names = [n for n, _ in model.named_parameters()]
    size = sum(p.numel() for p in model.parameters())
    last = slice(size - 10 - 160, size - 10)  # the 10 x 16 output weight
    for i in range(20):
        u = sgd_update(model, train.x[i : i + 1], train.y[i : i + 1], names, 0.1)
        assert infer_label(u, last, 10) == int(train.y[i])


@pytest.fixture(scope="module")
def digit():
    train, _ = load_dataset("digits", None, seed=0)
    torch.manual_seed(0)
    model = build_model("mlp", train.input_shape, 10, hidden=32)
    names = [n for n, _ in model.named_parameters()]
    lo, hi = float(train.x.min()), float(train.x.max())
    x, y = train.x[3:4], train.y[3:4]
    return model, names, x, y, (lo, hi), sgd_update(model, x, y, names, 0.05)


def _to01(x, bounds):
    lo, hi = bounds
    return (x - lo) / (hi - lo)


def test_inversion_recovers_one_image_from_an_fp32_step(digit):
    model, names, x, y, bounds, u = digit
    xh = invert(model, u, y, tuple(x.shape[1:]), names, bounds=bounds, steps=200, lr=0.1, seed=0)
    assert psnr(_to01(xh, bounds), _to01(x, bounds)) >= 20
    again = invert(model, u, y, tuple(x.shape[1:]), names, bounds=bounds, steps=200, seed=0)
    assert torch.equal(xh, again)  # seeded: the same dummy, the same reconstruction


def test_inversion_fails_on_a_noised_step(digit):
    model, names, x, y, bounds, u = digit
    g = torch.Generator().manual_seed(0)
    noisy = u + 30 * u.norm() / math.sqrt(u.numel()) * torch.randn(u.numel(), generator=g)
    xh = invert(model, noisy, y, tuple(x.shape[1:]), names, bounds=bounds, steps=200, seed=0)
    assert psnr(_to01(xh, bounds), _to01(x, bounds)) < 12


def test_match_images_is_the_best_permutation():
    import itertools

    g = torch.Generator().manual_seed(3)
    truth = torch.rand(4, 1, 5, 5, generator=g)
    recon = (truth[[2, 0, 3, 1]] + 0.3 * torch.rand(4, 1, 5, 5, generator=g)).clamp(0, 1)
    pairs = match_images(recon, truth)
    total = sum(psnr(recon[j], truth[k]) for j, k in pairs)
    best = max(
        sum(psnr(recon[j], truth[p[j]]) for j in range(4)) for p in itertools.permutations(range(4))
    )
    assert total == pytest.approx(best)
    assert sorted(pairs) == [(0, 2), (1, 0), (2, 3), (3, 1)]
    assert match_images(truth[:2], truth[:2]) == [(0, 0), (1, 1)]  # exact copies (inf dB)
