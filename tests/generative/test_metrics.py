from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from fedtier.data import load_dataset
from fedtier.errors import FedtierError
from fedtier.generative import (
    FID_NOTE,
    FidScorer,
    Judge,
    class_coverage,
    fid,
    fid_per_source,
    quality,
    region_coverage,
    sample_grid,
    source_shares,
    to_pm1,
    train_judge,
)
from fedtier.generative.metrics import KL_EPSILON
from tests.generative.conftest import controlled_judge, images_with_probs


@pytest.fixture(scope="module")
def digits_judge():
    train, _ = load_dataset("digits")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    x, y = to_pm1(train.x, train)[order], train.y[order]
    return x, train_judge(x[:400], y[:400], seed=0, num_classes=10, epochs=2, use_cache=False)


def frechet_numpy(a: np.ndarray, b: np.ndarray) -> float:
    """Closed form ‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa Σb)^½), unbiased covariances, with
    Tr (Σa Σb)^½ = Tr (Σa^½ Σb Σa^½)^½ (similar matrices; the symmetric form is stable when
    dead ReLU units make the covariances singular)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    half = scipy.linalg.sqrtm(cov_a).real
    root = scipy.linalg.sqrtm(half @ cov_b @ half).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_fid_matches_the_closed_form(digits_judge):
    x, judge = digits_judge
    real, fake = x[:300], (x[300:600] + 0.3).clamp(-1, 1)
    expected = frechet_numpy(
        judge.features(real).double().numpy(), judge.features(fake).double().numpy()
    )
    assert expected > 0.05
    assert fid(real, fake, judge) == pytest.approx(expected, rel=1e-3)


def test_fid_zero_on_itself_and_grows_with_a_shift(digits_judge):
    x, judge = digits_judge
    real = x[:500]
    scorer = FidScorer(real, judge)
    assert abs(scorer.score(real)) < 1e-8 < 1e-3 < scorer.score(real + 0.1)
    scores = [scorer.score(real + s) for s in (0.1, 0.3, 0.6)]
    assert scores[0] < scores[1] < scores[2]
    assert scores[1] == pytest.approx(fid(real, real + 0.3, judge), rel=1e-6)
    assert "in-house" in FID_NOTE and "Inception" in FID_NOTE
    with pytest.raises(FedtierError, match="at least 2"):
        scorer.score(real[:1])


def test_class_coverage_hand_computed():
    judge = controlled_judge(3)
    fake = images_with_probs(
        [[0.95, 0.03, 0.02], [0.6, 0.3, 0.1], [0.1, 0.85, 0.05], [0.04, 0.04, 0.92]]
    )
    out = class_coverage(fake, judge, torch.tensor([0, 1, 2, 2, 2]))
    assert out["class_shares"] == pytest.approx([0.5, 0.25, 0.25])
    assert out["data_shares"] == pytest.approx([0.2, 0.2, 0.6])
    # KL(p_data || q) = .2 ln(.2/.5) + .2 ln(.2/.25) + .6 ln(.6/.25)  (the reverse: 0.295)
    kl = 0.2 * math.log(0.4) + 0.2 * math.log(0.8) + 0.6 * math.log(2.4)
    assert out["kl_data_generated"] == pytest.approx(kl, abs=1e-5)
    assert out["mean_confidence"] == pytest.approx((0.95 + 0.6 + 0.85 + 0.92) / 4, abs=1e-6)
    assert out["confident_share"] == pytest.approx(0.5)
    assert out["confident_class_shares"] == pytest.approx([0.25, 0.0, 0.25])
    lenient = class_coverage(fake, judge, torch.tensor([0, 1, 2, 2]), confident=0.8)
    assert lenient["confident_share"] == pytest.approx(0.75)
    even = class_coverage(
        images_with_probs([[0.5, 0.5]] * 2), controlled_judge(2), [0, 1], confident=0.5
    )
    assert even["confident_share"] == 1.0  # max softmax exactly 0.5: at the threshold counts


def test_class_coverage_missing_class_uses_epsilon():
    judge = controlled_judge(2)
    fake = images_with_probs([[0.99, 0.01]] * 4)
    out = class_coverage(fake, judge, np.array([0, 1]))
    q = np.array([1 + KL_EPSILON, KL_EPSILON]) / (1 + 2 * KL_EPSILON)
    expected = 0.5 * math.log(0.5 / q[0]) + 0.5 * math.log(0.5 / q[1])
    assert out["kl_data_generated"] == pytest.approx(expected, rel=1e-9)
    assert out["kl_data_generated"] > 6  # ~ 0.5 ln(0.5e6): dropping a class costs a lot


def test_region_coverage_hand_computed():
    judge = controlled_judge(4)
    sure = {c: [0.94 if k == c else 0.02 for k in range(4)] for c in range(4)}
    unsure = [0.1, 0.1, 0.1, 0.7]
    # 10 samples: class 0 confident x4, class 1 confident x1, class 3 unsure x5
    fake = images_with_probs([sure[0]] * 4 + [sure[1]] + [unsure] * 5)
    out = region_coverage(fake, judge, [[0, 1], [2, 3]], min_share=0.2)
    assert out["produced"] == [[0], []]
    assert out["fraction"] == [0.5, 0.0]
    assert out["mean_fraction"] == 0.25
    out = region_coverage(fake, judge, [[0, 1], [2, 3]], min_share=0.1)
    assert out["produced"] == [[0, 1], []] and out["fraction"] == [1.0, 0.0]
    out = region_coverage(fake, judge, [[0, 1], [2, 3]], confident=0.6, min_share=0.1)
    assert out["produced"] == [[0, 1], [3]] and out["fraction"] == [1.0, 0.5]
    assert region_coverage(fake, judge, [[0]])["min_share"] == 0.25 / 4
    with pytest.raises(FedtierError, match="region_classes"):
        region_coverage(fake, judge, [[0, 4]])


def test_source_shares_hand_computed():
    judge = controlled_judge(3)
    fake = images_with_probs([[0.5, 0.3, 0.2], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.6, 0.2, 0.2]])
    assert source_shares(fake, judge) == pytest.approx([0.5, 0.25, 0.25])


def test_sample_grid_png_pixels(tmp_path):
    images = torch.tensor(
        [
            [[-1.0, 1.0], [0.0, 0.5]],
            [[1.0, 1.0], [1.0, 1.0]],
            [[-1.0, -1.0], [-1.0, 2.0]],  # 2 is clamped to 1
        ]
    ).unsqueeze(1)
    path = sample_grid(images, tmp_path / "sub" / "grid.png", nrow=2, padding=1)
    got = np.asarray(Image.open(path))
    assert got.shape == (2 * 2 + 3, 2 * 2 + 3) and got.dtype == np.uint8
    expected = np.full((7, 7), 128, np.uint8)
    expected[1:3, 1:3] = [[0, 255], [128, 191]]  # (v + 1) * 127.5, rounded
    expected[1:3, 4:6] = 255
    expected[4:6, 1:3] = [[0, 0], [0, 255]]
    np.testing.assert_array_equal(got, expected)
    big = np.asarray(Image.open(sample_grid(images, tmp_path / "big.png", nrow=10, scale=3)))
    assert big.shape == (6 + 2 * 2, 3 * 6 + 4 * 2)
    assert (big[2:8, 2:8] == 255)[:3, 3:].all()  # top-right quarter of image 0, enlarged
    with pytest.raises(FedtierError, match=r"\[N, 1, H, W\]"):
        sample_grid(images[:, 0], tmp_path / "bad.png")


def test_quality_flattens_every_score(digits_judge):
    judge = controlled_judge(3)
    fake = images_with_probs(
        [[0.95, 0.03, 0.02], [0.6, 0.3, 0.1], [0.1, 0.85, 0.05], [0.04, 0.04, 0.92]]
    )
    out = quality(fake, judge, torch.tensor([0, 1, 2, 2]), region_classes=[[0], [1, 2]])
    assert out == pytest.approx(
        {
            "kl_data_generated": 0.25 * math.log(2),
            "mean_confidence": (0.95 + 0.6 + 0.85 + 0.92) / 4,
            "confident_share": 0.5,
            "class_share/0": 0.5,
            "class_share/1": 0.25,
            "class_share/2": 0.25,
            "region_coverage/0": 1.0,  # class 0: 1 of 4 samples confident >= 0.25 / 3
            "region_coverage/1": 0.5,  # class 2 yes, class 1 (only 0.85) no
            "region_coverage/mean": 0.75,
        },
        abs=1e-5,
    )
    x, real_judge = digits_judge
    scorer = FidScorer(x[:100], real_judge)
    source = controlled_judge(2)
    both = quality(
        images_with_probs([[0.3, 0.7]] * 3 + [[0.8, 0.2]]), source, [0, 1], source_judge=source
    )
    assert both["source_share/0"] == 0.25 and both["source_share/1"] == 0.75
    assert "fid" not in both
    with_fid = quality(x[100:200], real_judge, [0, 1], fid_against=scorer)
    assert with_fid["fid"] == pytest.approx(fid(x[:100], x[100:200], real_judge), rel=1e-9)


def test_fid_per_source_scores_each_sources_share_against_its_own_real_set(digits_judge):
    x, judge = digits_judge
    # a 1-pixel "source judge" on 8×8 images: source = whether pixel (0, 0) is bright
    linear = torch.nn.Linear(64, 2, bias=False).requires_grad_(False)
    linear.weight.zero_()
    linear.weight[1, 0] = 100.0  # logit of source 1 = 100 × pixel (0, 0); of source 0: 0
    source = Judge(torch.nn.Sequential(torch.nn.Flatten(), linear), 2, (1, 8, 8), "t", False, 0.0)
    dark, bright = x[:150].clone(), x[150:300].clone()
    dark[:, :, 0, 0], bright[:, :, 0, 0] = -1.0, 1.0
    fake = torch.cat([bright[:60], dark[:90]])
    scorers = [FidScorer(dark[100:], judge), FidScorer(bright[100:], judge)]
    got = fid_per_source(fake, scorers, source)
    assert got[0] == pytest.approx(fid(dark[100:], dark[:90], judge), rel=1e-9)
    assert got[1] == pytest.approx(fid(bright[100:], bright[:60], judge), rel=1e-9)
    assert fid_per_source(dark[:5], scorers, source)[1] is None
    with pytest.raises(FedtierError, match="2 sources"):
        fid_per_source(fake, scorers[:1], source)
