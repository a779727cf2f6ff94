"""Trigger detection at the edge: the four detectors against brute force, the guard on
all-clean batches, rates (SPEC §8)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from fedtier.defenses.sampling import (
    DETECTORS,
    Reference,
    auroc,
    best_tpr,
    check_detector,
    detect,
    rates,
    split,
    step_distance,
)
from fedtier.errors import ConfigError


def _threshold_splits(d: np.ndarray) -> list[np.ndarray]:
    """Every split of d into a lower and an upper non-empty group by a threshold."""
    s = np.unique(d)
    return [d > s[i] for i in range(len(s) - 1)]


def _wcss(d: np.ndarray, u: np.ndarray) -> float:
    """Within-group sum of squares of the split ``u``."""
    return float(((d[u] - d[u].mean()) ** 2).sum() + ((d[~u] - d[~u].mean()) ** 2).sum())


def _brute(d: np.ndarray, detector: str) -> np.ndarray:
    """The split each detector's definition picks, by trying every threshold."""
    cands = _threshold_splits(d)
    if detector == "average":  # the split whose threshold brackets the mean
        return next(u for u in cands if d[~u].max() <= d.mean() < d[u].min())
    if detector == "max-min":
        mid = (d.max() + d.min()) / 2
        return next(u for u in cands if d[~u].max() <= mid < d[u].min())
    if detector == "maxsplit":  # the largest gap between the groups (first on a tie)
        gaps = [d[u].min() - d[~u].max() for u in cands]
        return cands[int(np.argmax(gaps))]
    # kmeans: the split with the least within-group sum of squares
    return cands[int(np.argmin([_wcss(d, u) for u in cands]))]


@pytest.mark.parametrize("detector", DETECTORS)
def test_detectors_split_like_brute_force_over_thresholds(detector: str) -> None:
    rng = np.random.default_rng(7)
    for case in range(25 if detector == "kmeans" else 60):
        n = int(rng.integers(3, 10))
        d = np.round(rng.gamma(2.0, 1.0, n) + (rng.random(n) < 0.3) * rng.uniform(0, 6), 3)
        if len(np.unique(d)) < 2:
            continue
        want = _brute(d, detector)
        got = split(d, detector, seed=case)
        if detector == "kmeans":  # ties between equally good splits: compare the objective
            assert _wcss(d, got) == pytest.approx(_wcss(d, want), rel=1e-9), (d, got, want)
        else:
            assert np.array_equal(got, want), (d, got, want)


def test_detectors_on_hand_made_vectors() -> None:
    d = np.array([1.0, 1.2, 0.9, 5.0, 5.3, 1.1])
    for det in DETECTORS:
        assert split(d, det).tolist() == [False, False, False, True, True, False]
    # the mean (2.0) and the midpoint (3.0) differ from the largest gap (between 2 and 9)
    d = np.array([0.0, 1.0, 2.0, 9.0, 10.0])
    assert split(d, "average").tolist() == [False, False, False, True, True]
    d = np.array([0.0, 0.5, 1.0, 4.0, 10.0])  # mean 3.1, midpoint 5, largest gap 4 → 10
    assert split(d, "average").tolist() == [False, False, False, True, True]
    assert split(d, "max-min").tolist() == [False, False, False, False, True]
    assert split(d, "maxsplit").tolist() == [False, False, False, False, True]
    # a constant batch, or a single input, is never split
    for det in DETECTORS:
        assert not split(np.ones(5), det).any()
        assert not split(np.array([3.0]), det).any()


def test_detect_flags_the_group_away_from_the_clean_reference() -> None:
    ref = Reference(center=10.0, spread=1.0)
    high = np.array([10.1, 9.8, 10.3, 25.0, 24.0, 9.9])
    low = np.array([10.1, 9.8, 10.3, 2.0, 1.5, 9.9])
    for det in DETECTORS:
        assert detect(high, det, ref, guard=3.0).tolist() == [0, 0, 0, 1, 1, 0]
        assert detect(low, det, ref, guard=3.0).tolist() == [0, 0, 0, 1, 1, 0]
        # without a reference the minority group is flagged
        assert detect(low, det, None, guard=0).tolist() == [0, 0, 0, 1, 1, 0]


@pytest.mark.parametrize("detector", DETECTORS)
def test_guard_keeps_all_clean_batches_whole(detector: str) -> None:
    """All-clean batches (d of clean inputs: Gaussian around the reference) are split by every
    detector without the guard; with the guard at 3 spreads, at most 1% of their inputs are
    flagged, while a batch with 10% inputs 8 spreads away is caught whole."""
    rng = np.random.default_rng(0)
    ref = Reference.of(rng.normal(20.0, 1.0, 1000))
    flagged = unguarded = total = 0
    for b in range(40):
        d = rng.normal(20.0, 1.0, 64)
        flagged += int(detect(d, detector, ref, guard=3.0, seed=b).sum())
        unguarded += int(detect(d, detector, None, guard=0, seed=b).sum())
        total += 64
    assert flagged / total <= 0.01
    assert unguarded / total > 0.01  # the detectors alone always split
    d = rng.normal(20.0, 1.0, 64)
    d[:6] += 8.0
    got = detect(d, detector, ref, guard=3.0)
    assert np.array_equal(got, split(d, detector))  # the guard lets the split through
    r = rates(got, np.arange(64) < 6)
    assert r["tpr"] == 1.0
    # the mean sits inside the clean group's upper tail: ``average`` flags some clean inputs
    assert r["fpr"] == 0.0 if detector != "average" else r["fpr"] > 0.0


def test_rates_and_distance() -> None:
    flags = np.array([1, 1, 0, 0, 1], bool)
    triggered = np.array([1, 0, 1, 0, 0], bool)
    assert rates(flags, triggered) == {"tpr": 0.5, "fpr": pytest.approx(2 / 3)}
    assert np.isnan(rates(flags, np.zeros(5, bool))["tpr"])
    a = torch.zeros(2, 1, 2, 2)
    b = torch.tensor([[3.0, 4.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]).view(2, 1, 2, 2)
    assert step_distance(a, b).tolist() == [5.0, 2.0]


def test_unknown_detector_is_a_config_error_with_did_you_mean() -> None:
    with pytest.raises(ConfigError, match=r"'max-mn'.*did you mean 'max-min'"):
        check_detector("max-mn")
    with pytest.raises(ConfigError, match="k-means"):
        split(np.ones(3), "k-means")
    for det in DETECTORS:
        assert check_detector(det) == det


def test_all_threshold_splits_are_enumerated() -> None:
    d = np.array([3.0, 1.0, 2.0, 2.0])
    got = {tuple(u) for u in _threshold_splits(d)}
    want = set()
    for lo in itertools.product([False, True], repeat=4):
        u = np.array(lo)
        if u.any() and not u.all() and d[~u].max() < d[u].min():
            want.add(tuple(u))
    assert got == want


def _pairwise_auroc(clean: np.ndarray, trig: np.ndarray) -> float:
    """P(s_trig > s_clean) + ½ P(tie), counted over every pair."""
    wins = sum((t > c) + 0.5 * (t == c) for t in trig for c in clean)
    return float(wins) / (len(clean) * len(trig))


def test_auroc_is_the_pairwise_count_with_ties_at_one_half() -> None:
    rng = np.random.default_rng(11)
    for _ in range(40):
        clean = rng.integers(0, 6, int(rng.integers(1, 9))).astype(float)  # many ties
        trig = rng.integers(0, 8, int(rng.integers(1, 9))).astype(float)
        assert auroc(clean, trig) == pytest.approx(_pairwise_auroc(clean, trig), abs=1e-12)
    assert auroc(np.array([1.0, 2.0]), np.array([3.0])) == 1.0
    assert auroc(np.array([3.0]), np.array([1.0, 2.0])) == 0.0  # triggered score lower
    assert auroc(np.array([2.0]), np.array([2.0])) == 0.5
    with pytest.raises(ValueError, match="at least one"):
        auroc(np.array([]), np.array([1.0]))


def _brute_best_tpr(clean: np.ndarray, trig: np.ndarray, max_fpr: float) -> float:
    """Try every threshold θ (each value, and above all): flag s ≥ θ."""
    best = 0.0
    for theta in [*np.unique(np.r_[clean, trig]), np.inf]:
        if (clean >= theta).mean() <= max_fpr:
            best = max(best, float((trig >= theta).mean()))
    return best


def test_best_tpr_is_the_best_threshold_within_the_fpr() -> None:
    rng = np.random.default_rng(5)
    for _ in range(60):
        clean = rng.integers(0, 9, int(rng.integers(1, 25))).astype(float)
        trig = rng.integers(2, 12, int(rng.integers(1, 12))).astype(float)
        for max_fpr in (0.0, 0.05, 0.2, 0.5):
            want = _brute_best_tpr(clean, trig, max_fpr)
            assert best_tpr(clean, trig, max_fpr) == pytest.approx(want, abs=1e-12)
    # 20 clean, one of them above every triggered input: at FPR ≤ 5% all triggered are caught
    clean = np.r_[np.arange(19.0), 100.0]
    assert best_tpr(clean, np.array([50.0, 60.0]), 0.05) == 1.0
    assert best_tpr(clean, np.array([50.0, 60.0]), 0.0) == 0.0
