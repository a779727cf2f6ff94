"""Collaborative sampling's costs against a hand computation of SPEC §6/§8's formulas."""

import numpy as np
import pytest

from fedtier.config import CostConfig, TopologyConfig
from fedtier.costs import CostModel
from fedtier.costs.sampling import collaborative_costs, record_sampling, sampling_table
from fedtier.errors import FedtierError
from fedtier.topology import build_topology


def _model():
    topo = build_topology(TopologyConfig(edges=1, clients=3), np.full(3, 40), seed=0)
    return CostModel(CostConfig(edge_ghz=2.0, edge_cores=4), topo, epochs=1, param_count=10)


def test_costs_match_a_hand_computation():
    m = _model()
    clients, n, d, S, t, c = [0, 2], np.array([3, 5]), 256, 10, 4, 1e6
    got = collaborative_costs(m, clients, n, d, S, t, c)
    B = m.cfg.bandwidth_hz
    for k, j in enumerate(clients):
        bits = 32 * d * n[k]
        up = bits / (B * np.log2(1 + m.gain[j] * m.p_max_w[j]))
        down = bits / (B * np.log2(1 + m.gain[j] * 1.0))
        wait = max(
            32 * d * n[i] / (B * np.log2(1 + m.gain[q] * m.p_max_w[q]))
            for i, q in enumerate(clients)
        )
        edge = t * c * n.sum() / (4 * 2e9)
        local = (S - t) * c * n[k]
        f = m.f_max_hz[j]
        assert got.device_latency_s[k] == pytest.approx(wait + edge + down + local / f)
        assert got.device_energy_j[k] == pytest.approx(
            m.p_max_w[j] * up + m.capacitance[j] * local * f**2
        )
    assert got.edge_energy_j == pytest.approx(1e-28 * t * c * 8 * (2e9) ** 2)
    assert got.bytes_up == got.bytes_down == 4 * d * 8


def test_device_only_sends_nothing_and_edge_only_leaves_the_device_no_compute():
    m = _model()
    rows = sampling_table(m, [0, 1], np.array([2, 2]), 64, 5, 1e6)
    assert [r["t"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert rows[0]["bytes_up"] == 0 and rows[0]["edge_time_s"] == 0
    assert rows[0]["device_energy_j"] > rows[5]["device_energy_j"] > 0  # upload energy only
    energies = [r["device_energy_j"] for r in rows[1:]]
    assert energies == sorted(energies, reverse=True)  # each shared step saves device work
    record_sampling(m, collaborative_costs(m, [0, 1], np.array([2, 2]), 64, 5, 2, 1e6))
    assert m.totals["sampling_bytes_up"] == 2 * 4 * 64 * 2


def test_more_shared_steps_than_sampling_steps_are_refused():
    with pytest.raises(FedtierError, match=r"t = 6 must be in 0\.\.5"):
        collaborative_costs(_model(), [0], np.array([1]), 4, 5, 6, 1.0)
