"""Cost of collaborative sampling (SS-Diff, SPEC §8): the edge runs the first t of the S
denoising steps for the whole batch, the devices the remaining S − t.

Per device j requesting n_j images of d values (float32), with c cycles per image and
denoising step (the denoiser's counted forward FLOPs / FLOPs per cycle):

    uplink x_T      (t > 0)  bits_j = 32 d n_j,  T^up_j = bits_j / R_j(P_max),  E^up_j = P_max T^up_j
    edge, t steps            cycles_e = t c Σ_j n_j,  T^edge = cycles_e / (K f_edge),
                             E^edge = τ_edge cycles_e f_edge²   (K cores at f_edge each)
    downlink x_{T−t} (t > 0) T^down_j = bits_j / R_j(P_edge)  (the edge transmits on j's block)
    device, S − t steps      T^loc_j = (S − t) c n_j / f_j,  E^loc_j = τ_j (S − t) c n_j f_j²

The edge starts once every x_T has arrived, so device j's latency is
max_k T^up_k + T^edge + T^down_j + T^loc_j, and its energy E^up_j + E^loc_j (receiving is not
priced). Devices compute at f_max (sampling has no deadline to trade against). t = 0 is
device-only sampling (nothing sent), t = S edge-only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedtier.costs.model import CostModel
from fedtier.costs.wireless import rate_bps
from fedtier.errors import FedtierError


@dataclass(frozen=True)
class SamplingCosts:
    """Costs of one collaborative sampling batch; arrays [n] over the requesting devices."""

    shared: int  # t
    steps: int  # S
    device_energy_j: np.ndarray
    device_latency_s: np.ndarray
    edge_time_s: float
    edge_energy_j: float
    bytes_up: float  # x_T, devices → edge
    bytes_down: float  # x_{T−t}, edge → devices

    def row(self) -> dict[str, float]:
        """One table row: t, the devices' mean energy and latency, the slowest latency, the
        edge's time and energy, and the bytes both ways."""
        return {
            "t": self.shared,
            "device_energy_j": float(self.device_energy_j.mean()),
            "device_latency_s": float(self.device_latency_s.mean()),
            "max_latency_s": float(self.device_latency_s.max()),
            "edge_time_s": self.edge_time_s,
            "edge_energy_j": self.edge_energy_j,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
        }


def collaborative_costs(
    costs: CostModel,
    clients: list[int],
    images: np.ndarray,
    values_per_image: int,
    steps: int,
    shared: int,
    cycles_per_step: float,
) -> SamplingCosts:
    """Time, energy and bytes of sampling ``images`` [n] images for each of ``clients`` (one
    edge's devices) with the edge running ``shared`` = t of the ``steps`` = S DDIM steps."""
    if not 0 <= shared <= steps:
        raise FedtierError(
            f"collaborative sampling: the edge's shared steps t = {shared} must be in 0..{steps} "
            f"(the S sampling steps)"
        )
    idx = np.asarray(clients)
    n = np.asarray(images, dtype=np.float64)
    c = costs.cfg
    bits = 32.0 * values_per_image * n if shared > 0 else np.zeros_like(n)
    gain = costs.gain[idx]
    t_up = bits / rate_bps(c.bandwidth_hz, gain, costs.p_max_w[idx])
    t_down = bits / rate_bps(c.bandwidth_hz, gain, np.full(len(idx), c.edge_power_w))
    edge_cycles = shared * cycles_per_step * n.sum()
    f_edge = c.edge_ghz * 1e9
    edge_time = edge_cycles / (c.edge_cores * f_edge)
    f = costs.f_max_hz[idx]
    local_cycles = (steps - shared) * cycles_per_step * n
    t_local = local_cycles / f
    wait = float(t_up.max(initial=0.0))
    return SamplingCosts(
        shared=shared,
        steps=steps,
        device_energy_j=costs.p_max_w[idx] * t_up + costs.capacitance[idx] * local_cycles * f**2,
        device_latency_s=wait + edge_time + t_down + t_local,
        edge_time_s=float(edge_time),
        edge_energy_j=float(c.edge_capacitance * edge_cycles * f_edge**2),
        bytes_up=float(bits.sum() / 8),
        bytes_down=float(bits.sum() / 8),
    )


def record_sampling(costs: CostModel, s: SamplingCosts) -> None:
    """Add one sampling batch to the run's cost ledger (``sampling_*`` totals)."""
    t = costs.totals
    t["sampling_device_energy_j"] += float(s.device_energy_j.sum())
    t["sampling_edge_energy_j"] += s.edge_energy_j
    t["sampling_edge_time_s"] += s.edge_time_s
    t["sampling_time_s"] = max(t["sampling_time_s"], float(s.device_latency_s.max(initial=0.0)))
    t["sampling_bytes_up"] += s.bytes_up
    t["sampling_bytes_down"] += s.bytes_down


def sampling_table(
    costs: CostModel,
    clients: list[int],
    images: np.ndarray,
    values_per_image: int,
    steps: int,
    cycles_per_step: float,
) -> list[dict[str, Any]]:
    """:meth:`SamplingCosts.row` for every t from 0 (device-only) to S (edge-only)."""
    return [
        collaborative_costs(
            costs, clients, images, values_per_image, steps, t, cycles_per_step
        ).row()
        for t in range(steps + 1)
    ]
