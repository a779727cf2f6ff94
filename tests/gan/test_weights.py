"""The cloud's region weights against softmaxes and staleness factors computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedtier.gan import region_weights


def _normalise(values: list[float]) -> list[float]:
    total = sum(values)
    return [v / total for v in values]


def test_neg_loss_is_softmax_of_minus_loss_over_t() -> None:
    losses = [-0.5, -0.7, -0.6]
    want = _normalise([math.exp(5.0), math.exp(7.0), math.exp(6.0)])  # −L/T with T = 0.1
    np.testing.assert_allclose(region_weights(np.array(losses), 0.1, "neg-loss"), want, rtol=1e-12)


def test_pos_loss_is_the_seeds_exp_of_plus_loss() -> None:
    losses = [-0.5, -0.7, -0.6]
    want = _normalise([math.exp(-0.5 / 2), math.exp(-0.7 / 2), math.exp(-0.6 / 2)])
    np.testing.assert_allclose(region_weights(np.array(losses), 2.0, "pos-loss"), want, rtol=1e-12)


def test_staleness_damps_by_one_plus_age_to_minus_alpha() -> None:
    losses, ages = [-0.3, -0.3, -0.4], [0, 3, 1]
    want = _normalise([math.exp(3.0) * 1.0, math.exp(3.0) * 4**-0.5, math.exp(4.0) * 2**-0.5])
    got = region_weights(np.array(losses), 0.1, "neg-loss", np.array(ages), alpha=0.5)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_regions_that_never_reported_weigh_zero() -> None:
    got = region_weights(np.array([-0.3, 0.0, -0.5]), 1.0, reported=np.array([True, False, True]))
    first, third = _normalise([math.exp(0.3), math.exp(0.5)])
    np.testing.assert_allclose(got, [first, 0.0, third], rtol=1e-12)


def test_tiny_temperature_neither_overflows_nor_loses_the_winner() -> None:
    got = region_weights(np.array([-3.0, -2.0, -1.0]), 1e-4)
    assert np.all(np.isfinite(got)) and got[0] == pytest.approx(1.0)


@pytest.mark.parametrize("t", [0.0, -1.0])
def test_bad_temperature(t: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        region_weights(np.array([-0.1, -0.2]), t)
