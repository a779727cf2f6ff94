import numpy as np
import pytest
from scipy.optimize import minimize

from fedtier.costs import allocate_min_energy, device_costs, rate_bps, snr_gain
from fedtier.costs.wireless import noise_w_per_hz

B = 180e3


def _instance(seed, n=12):
    rng = np.random.default_rng(seed)
    return dict(
        cycles=2e7 * rng.integers(10, 80, n) * rng.integers(1, 4, n).astype(float),
        capacitance=rng.choice([1e-28, 2e-28], n),
        f_max_hz=rng.choice([0.5e9, 1e9, 2e9, 3e9], n),
        gain=snr_gain(rng.exponential(1, n), rng.uniform(10, 200, n), 3.5, B, -174),
        p_max_w=rng.choice([0.1, 0.2, 0.5], n),
        bits=rng.uniform(5e5, 7e6, n),
    )


def test_rate_and_costs_follow_the_equations():
    assert noise_w_per_hz(-174) == pytest.approx(3.981e-21, rel=1e-3)
    g = snr_gain(np.array([1.0]), np.array([100.0]), 3.5, B, -174)
    assert g[0] == pytest.approx(100.0**-3.5 / (B * 3.981e-21), rel=1e-3)
    a = device_costs(
        np.array([1e9]), np.array([2e-28]), np.array([2e9]), g, np.array([0.2]), np.array([1e6]), B
    )
    r = B * np.log2(1 + g * 0.2)
    assert rate_bps(B, g, np.array([0.2]))[0] == pytest.approx(r[0])
    assert a.t_cmp[0] == pytest.approx(0.5) and a.e_cmp[0] == pytest.approx(2e-28 * 1e9 * 4e18)
    assert a.t_com[0] == pytest.approx(1e6 / r[0]) and a.e_com[0] == pytest.approx(0.2 * 1e6 / r[0])


@pytest.mark.parametrize("seed", range(4))
def test_bisection_allocation_matches_scipy_on_random_instances(seed):
    inst = _instance(seed)
    deadline = 6.0
    opt = allocate_min_energy(**inst, bandwidth_hz=B, deadline_s=deadline)
    at_max = device_costs(
        **{k: inst[k] for k in ("cycles", "capacitance")},
        f_hz=inst["f_max_hz"],
        gain=inst["gain"],
        p_w=inst["p_max_w"],
        bits=inst["bits"],
        bandwidth_hz=B,
    )
    checked = 0
    for j in np.flatnonzero(opt.feasible):
        c, tau, fm, g, pm, s = (
            inst[k][j] for k in ("cycles", "capacitance", "f_max_hz", "gain", "p_max_w", "bits")
        )
        scale = at_max.energy[j]

        def energy(z, c=c, tau=tau, fm=fm, g=g, pm=pm, s=s, scale=scale):
            f, p = z[0] * fm, z[1] * pm
            return (tau * c * f**2 + p * s / (B * np.log2(1 + g * p))) / scale

        def slack(z, c=c, fm=fm, g=g, pm=pm, s=s):
            f, p = z[0] * fm, z[1] * pm
            return (deadline - c / f - s / (B * np.log2(1 + g * p))) / deadline

        best = min(
            (
                minimize(
                    energy,
                    z0,
                    method="SLSQP",
                    bounds=[(1e-4, 1), (1e-7, 1)],
                    constraints=[{"type": "ineq", "fun": slack}],
                    options={"ftol": 1e-15, "maxiter": 2000},
                )
                for z0 in ([1.0, 1.0], [0.7, 0.5])
            ),
            key=lambda r: r.fun if slack(r.x) > -1e-9 else np.inf,
        )
        assert slack(best.x) > -1e-9
        assert opt.energy[j] / scale == pytest.approx(best.fun, rel=1e-4)
        assert opt.time[j] == pytest.approx(deadline, rel=1e-9)  # the optimum uses the deadline
        assert opt.f_hz[j] <= fm * (1 + 1e-12) and opt.p_w[j] <= pm * (1 + 1e-12)
        checked += 1
    assert checked >= 6
    # optimised never spends more than the maximum operating point, and saves on every device
    assert (opt.energy[opt.feasible] < at_max.energy[opt.feasible]).all()


def test_infeasible_devices_are_reported_and_run_at_the_maximum():
    inst = _instance(1, n=30)
    opt = allocate_min_energy(**inst, bandwidth_hz=B, deadline_s=1.0)
    late = ~opt.feasible
    assert late.any() and opt.feasible.any()
    np.testing.assert_allclose(opt.f_hz[late], inst["f_max_hz"][late])
    np.testing.assert_allclose(opt.p_w[late], inst["p_max_w"][late])
    assert (opt.time[late] > 1.0).all()
    min_time = inst["cycles"] / inst["f_max_hz"] + inst["bits"] / rate_bps(
        B, inst["gain"], inst["p_max_w"]
    )
    np.testing.assert_array_equal(late, min_time > 1.0)


def test_a_tight_deadline_costs_more_energy():
    inst = _instance(2)
    loose = allocate_min_energy(**inst, bandwidth_hz=B, deadline_s=20.0)
    tight = allocate_min_energy(**inst, bandwidth_hz=B, deadline_s=8.0)
    both = loose.feasible & tight.feasible
    assert both.any() and (tight.energy[both] > loose.energy[both]).all()
