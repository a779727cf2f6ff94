"""SS-Diff's wireless and energy model and its energy-optimal resource allocation (SPEC §6).

Uplink OFDMA, one resource block of bandwidth B per scheduled device j:

    R_j       = B · log2(1 + g_j P_j),   g_j = |H_j|² d_j^{−η} / (B N0)
    T_j^com   = S_j / R_j                (S_j: the real encoded payload in bits)
    E_j^com   = P_j · T_j^com
    T_j^cmp   = c_j / f_j,  c_j = C · D_j · I_j  (cycles per sample × samples × local epochs)
    E_j^cmp   = τ_j · c_j · f_j²

Allocation: minimise E_j^cmp + E_j^com over f_j ≤ f_max, P_j ≤ P_max subject to
T_j^cmp + T_j^com ≤ T_max. In the times t₁ = c/f and t₂ = T^com each energy is convex and
decreasing (E^cmp = τc³/t₁², E^com = t₂(2^{a/t₂} − 1)/g with a = S/B), so the optimum spends
the whole deadline. Stationarity with a multiplier ν:

    t₁(ν) = cbrt(2τc³/ν)                          (SS-Diff's θ*, clamped to θ_min = c/f_max)
    t₂(ν) = a ln2 / (1 + W₀((νg − 1)/e))          (from −dE^com/dt₂ = ν; clamped to π_min)

and bisection on log ν makes t₁ + t₂ = T_max. Devices for which even f_max and P_max miss
T_max are infeasible: they run at the maximum and are reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import lambertw


def noise_w_per_hz(dbm_per_hz: float) -> float:
    """−174 dBm/Hz → 3.98e−21 W/Hz."""
    return float(10 ** (dbm_per_hz / 10) / 1000)


def snr_gain(
    channel_gain: np.ndarray,
    distance_m: np.ndarray,
    path_loss_exponent: float,
    bandwidth_hz: float,
    noise_dbm_hz: float,
) -> np.ndarray:
    """g_j = |H_j|² d_j^{−η} / (B N0): the SNR per watt of transmit power. ``channel_gain``
    is the small-scale power gain |H|² (Rayleigh fading: exponential with mean 1)."""
    return (
        channel_gain
        * distance_m ** (-path_loss_exponent)
        / (bandwidth_hz * noise_w_per_hz(noise_dbm_hz))
    )


def rate_bps(bandwidth_hz: float, gain: np.ndarray, power_w: np.ndarray) -> np.ndarray:
    """R_j = B log2(1 + g_j P_j)."""
    return bandwidth_hz * np.log2(1 + gain * power_w)


@dataclass(frozen=True)
class Allocation:
    """Per-device operating point and its costs, arrays [n]."""

    f_hz: np.ndarray
    p_w: np.ndarray
    t_cmp: np.ndarray
    t_com: np.ndarray
    e_cmp: np.ndarray
    e_com: np.ndarray
    feasible: np.ndarray  # bool: meets the deadline (always True without one)

    @property
    def time(self) -> np.ndarray:
        return self.t_cmp + self.t_com

    @property
    def energy(self) -> np.ndarray:
        return self.e_cmp + self.e_com


def device_costs(
    cycles: np.ndarray,
    capacitance: np.ndarray,
    f_hz: np.ndarray,
    gain: np.ndarray,
    p_w: np.ndarray,
    bits: np.ndarray,
    bandwidth_hz: float,
    deadline_s: float | None = None,
) -> Allocation:
    """Times and energies of devices at a given (f_j, P_j) (SPEC §6 equations)."""
    t_cmp = cycles / f_hz
    t_com = bits / rate_bps(bandwidth_hz, gain, p_w)
    feasible = (
        np.ones_like(t_cmp, dtype=bool) if deadline_s is None else t_cmp + t_com <= deadline_s
    )
    return Allocation(
        f_hz, p_w, t_cmp, t_com, capacitance * cycles * f_hz**2, p_w * t_com, feasible
    )


def _t_cmp(nu: np.ndarray, capacitance: np.ndarray, cycles: np.ndarray) -> np.ndarray:
    return np.cbrt(2 * capacitance * cycles**3 / nu)


def _t_com(nu: np.ndarray, gain: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Solve e^x (x − 1) + 1 = νg for x = a ln2 / t₂ (x = 1 + W₀((νg − 1)/e))."""
    y = nu * gain
    s = np.sqrt(2 * y)
    with np.errstate(invalid="ignore"):
        w = lambertw(np.maximum((y - 1) / np.e, -1 / np.e)).real
    # near νg → 0 the series x²/2 + x³/3 = νg avoids W's cancellation at −1/e
    x = np.where(y < 1e-6, s - s**2 / 3, 1 + w)
    with np.errstate(divide="ignore"):
        return a * np.log(2) / x


def allocate_min_energy(
    cycles: np.ndarray,
    capacitance: np.ndarray,
    f_max_hz: np.ndarray,
    gain: np.ndarray,
    p_max_w: np.ndarray,
    bits: np.ndarray,
    bandwidth_hz: float,
    deadline_s: float,
    iterations: int = 200,
) -> Allocation:
    """Energy-minimising (f_j, P_j) under T_j^cmp + T_j^com ≤ T_max (SS-Diff's problem P3),
    by the Lagrangian closed forms and bisection on ν (module docstring); vectorised over
    devices. Infeasible devices get (f_max, P_max) and ``feasible = False``."""
    cycles, capacitance, f_max_hz, gain, p_max_w, bits = (
        np.asarray(v, dtype=np.float64)
        for v in (cycles, capacitance, f_max_hz, gain, p_max_w, bits)
    )
    a = bits / bandwidth_hz
    t1_min = cycles / f_max_hz
    t2_min = a / np.log2(1 + gain * p_max_w)
    feasible = t1_min + t2_min <= deadline_s
    lo = np.full_like(cycles, -70.0)  # log10 ν: at 1e−70 every device is far too slow
    hi = np.full_like(cycles, 70.0)  # at 1e70 both times sit on their minimums
    for _ in range(iterations):
        mid = (lo + hi) / 2
        nu = 10.0**mid
        total = np.maximum(_t_cmp(nu, capacitance, cycles), t1_min) + np.maximum(
            _t_com(nu, gain, a), t2_min
        )
        late = total > deadline_s
        lo = np.where(late, mid, lo)
        hi = np.where(late, hi, mid)
    nu = 10.0**hi
    t1 = np.maximum(_t_cmp(nu, capacitance, cycles), t1_min)
    t2 = np.maximum(_t_com(nu, gain, a), t2_min)
    f = np.where(feasible, np.minimum(cycles / t1, f_max_hz), f_max_hz)
    p = np.where(feasible, np.minimum((2 ** (a / t2) - 1) / gain, p_max_w), p_max_w)
    out = device_costs(cycles, capacitance, f, gain, p, bits, bandwidth_hz, deadline_s)
    return Allocation(out.f_hz, out.p_w, out.t_cmp, out.t_com, out.e_cmp, out.e_com, feasible)
