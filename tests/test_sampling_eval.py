"""The sampling-phase security evaluation, with an oracle backdoored denoiser whose outcome is
known: triggered inputs always become the target, clean ones a fixed image."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedtier.attacks.baddiffusion import stealthy_noise, target_image, visible_noise
from fedtier.defenses.sampling import step_distance
from fedtier.defenses.sampling_eval import DetectionSettings, evaluate_detection, input_noise

SHAPE = (1, 8, 8)
STEPS, SHARED = 30, 3  # (1 − 0.7)^30: the chain ends at y or c


def toy_sampler(y: torch.Tensor, c: torch.Tensor, mask: torch.Tensor, a: float = 0.7):  # type: ignore[no-untyped-def]
    """A backdoored "model" whose outcome is known: step k maps x ← a·x + (1 − a)·m(x), with
    m = y (the target) when the trigger patch's mean lies above the moving threshold
    θ_k = a^k · 1.5 + (1 − a^k) · (mean of y and c on the patch), else the clean image c.
    The gate is consistent along the chain, so triggered noise (patch ≈ 3) ends at y and
    clean noise (patch ≈ 0) at c; ``clip`` clamps x to [−1, 1] before every step."""
    mid_p = float((y[mask].mean() + c[mask].mean()) / 2)

    def run(x: torch.Tensor, start: int, stop: int, clip: bool) -> torch.Tensor:
        for k in range(start, stop):
            if clip:
                x = x.clamp(-1, 1)
            theta = a**k * 1.5 + (1 - a**k) * mid_p
            gate = (x[:, mask].mean(1) > theta).float().view(-1, 1, 1, 1)
            x = a * x + (1 - a) * (gate * y + (1 - gate) * c)
        return x

    return run


@pytest.fixture(scope="module")
def oracle_result():  # type: ignore[no-untyped-def]
    y = target_image("box", SHAPE)
    c = torch.full(SHAPE, -1.0)
    r = torch.zeros(SHAPE)
    r[0, 5:, 5:] = 3.0
    sampler = toy_sampler(y, c, r != 0)
    settings = DetectionSettings(
        steps=STEPS,
        shared=SHARED,
        samples=60,
        triggered=40,
        reference=40,
        batch_size=20,
        batches=4,
        shares=(0.0, 0.3),
        response_share=0.3,
    )
    delivered: list[int] = []

    def count(images: torch.Tensor) -> float:  # a stand-in "FID": how many images came back
        delivered.append(len(images))
        return float(len(images))

    out = evaluate_detection(sampler, r, y, settings, seed=3, fid=count)
    return out, sampler, r, settings


def test_without_defense_every_visible_trigger_hits_and_no_clean_input_does(oracle_result):  # type: ignore[no-untyped-def]
    out, *_ = oracle_result
    assert out["no_defense"]["visible"]["asr"] == 1.0
    assert out["fid_clean"] == 60.0  # all clean images delivered


def test_distances_are_those_of_the_sampler(oracle_result):  # type: ignore[no-untyped-def]
    out, sampler, r, _ = oracle_result
    eps = input_noise(3, "triggered", 40, SHAPE)
    x = visible_noise(eps, r)
    d = step_distance(x, sampler(x, 0, SHARED, False)).numpy()
    assert out["distance"]["visible"]["mean"] == pytest.approx(float(d.mean()), rel=1e-6)
    clean = input_noise(3, "clean", 60, SHAPE)
    dc = step_distance(clean, sampler(clean, 0, SHARED, False)).numpy()
    from sklearn.metrics import roc_auc_score

    auroc = roc_auc_score(np.r_[np.zeros(60), np.ones(40)], np.r_[dc, d])
    assert out["auroc"]["visible"] == pytest.approx(auroc)
    # the per-step AUROC, from the one step-by-step pass, at every k: the sampler run k steps
    # in one call, and the AUROC counted over all pairs (ties one half)
    per_step = out["auroc_by_step"]["visible"]
    assert len(per_step) == STEPS and per_step[SHARED - 1] == pytest.approx(auroc)
    stealthy = stealthy_noise(eps, r)
    for k in (1, 2, 5, 9, STEPS):
        dk_clean = step_distance(clean, sampler(clean, 0, k, False)).numpy()
        for trig, x_T in (("visible", x), ("stealthy", stealthy)):
            dk = step_distance(x_T, sampler(x_T, 0, k, False)).numpy()
            wins = (dk[:, None] > dk_clean[None, :]) + 0.5 * (dk[:, None] == dk_clean[None, :])
            assert out["auroc_by_step"][trig][k - 1] == pytest.approx(wins.mean(), abs=1e-12)
            # the ceiling: the best threshold on d (either side) at FPR ≤ 5%, tried one by one
            best = 0.0
            for sign in (1.0, -1.0):
                for theta in [*np.unique(sign * np.r_[dk_clean, dk]), np.inf]:
                    if (sign * dk_clean >= theta).mean() <= 0.05:
                        best = max(best, float((sign * dk >= theta).mean()))
            assert out["best_tpr_by_step"][trig][k - 1] == pytest.approx(best, abs=1e-12)


def test_reject_and_replace_leave_exactly_the_missed_triggers(oracle_result):  # type: ignore[no-untyped-def]
    out, *_ = oracle_result
    responses = out["responses"]
    k = responses["triggered_per_batch"]
    assert k == 6 and responses["batches"] == math.ceil(60 / 14)
    for det in ("average", "maxsplit", "max-min", "kmeans", "chi2"):
        row = responses[det]
        missed = 1.0 - row["tpr"]
        # an unflagged trigger still hits (the oracle); a rejected or replaced one cannot
        assert row["reject"]["asr"] == pytest.approx(missed)
        assert row["replace"]["asr"] == pytest.approx(missed)
        flagged_clean = round(row["fpr"] * 60)
        assert row["reject"]["delivered_clean"] == 60 - flagged_clean
        assert row["reject"]["fid"] == 60 - flagged_clean
        assert row["replace"]["fid"] == 60.0 and row["itc"]["fid"] == 60.0


def test_the_visible_trigger_is_separated_and_chi2_catches_it(oracle_result):  # type: ignore[no-untyped-def]
    out, *_ = oracle_result
    assert out["auroc"]["visible"] == 1.0  # d separates them; the detectors nearly so
    at30 = out["rates"]["visible"]
    assert max(at30[d]["0.3"]["tpr"] - at30[d]["0.3"]["fpr"] for d in at30) >= 0.95
    assert at30["kmeans"]["0.3"]["tpr"] >= 0.9 and at30["kmeans"]["0.3"]["fpr"] <= 0.05
    assert out["rates"]["visible"]["chi2"]["0.3"]["tpr"] == 1.0  # ‖r‖² = 81 on 64 dims
    assert out["responses"]["kmeans"]["reject"]["asr"] <= 0.1
    # all-clean batches: the guard keeps them whole
    for det in ("average", "maxsplit", "max-min", "kmeans"):
        assert out["rates"]["visible"][det]["0"]["fpr"] <= 0.05
        assert math.isnan(out["rates"]["visible"][det]["0"]["tpr"])
        assert out["unguarded_fpr"][det] > 0.05  # without the guard they split them


def test_same_seed_same_tables_and_noise_keyed_per_input() -> None:
    y = target_image("box", SHAPE)
    r = torch.zeros(SHAPE)
    r[0, 5:, 5:] = 3.0
    sampler = toy_sampler(y, torch.full(SHAPE, -1.0), r != 0)
    small = DetectionSettings(
        steps=8, shared=2, samples=20, triggered=10, reference=10, batch_size=10, batches=2,
        detectors=("maxsplit",), shares=(0.3,),
    )  # fmt: skip
    a = evaluate_detection(sampler, r, y, small, seed=1)
    b = evaluate_detection(sampler, r, y, small, seed=1)
    assert repr(a) == repr(b)
    # input i's noise is the same whatever the pool's size
    torch.testing.assert_close(
        input_noise(1, "clean", 20, SHAPE)[:5], input_noise(1, "clean", 5, SHAPE)
    )
    assert not torch.equal(input_noise(1, "clean", 5, SHAPE), input_noise(2, "clean", 5, SHAPE))
