import numpy as np

from fedtier.config import TopologyConfig
from fedtier.quant.election import elect_bits
from fedtier.topology import build_topology, expected_sampled, plan_round


def _topo(**kw):
    cfg = TopologyConfig(**kw)
    return cfg, build_topology(cfg, np.full(cfg.clients, 40), seed=0)


def test_clients_spread_over_edges_without_overlap():
    _, t = _topo(edges=3, clients=10)
    ids = np.concatenate(t.edge_clients)
    assert sorted(ids.tolist()) == list(range(10)) and t.num_edges == 3


def test_round_plan_is_replayable_and_respects_counts():
    cfg, t = _topo(edges=4, clients=100, edges_per_round=0.5, clients_per_edge=5)
    a, b = plan_round(t, cfg, 0, 3), plan_round(t, cfg, 0, 3)
    assert a.to_dict() == b.to_dict()
    assert len(a.edges) == 2 and all(len(c) == 5 for c in a.edges.values())
    for e, cs in a.edges.items():
        assert set(cs) <= set(t.edge_clients[e].tolist())
    assert plan_round(t, cfg, 0, 4).to_dict() != a.to_dict()
    assert expected_sampled(t, cfg) == 10


def test_default_device_mix_elects_8_and_4():
    _, t = _topo(edges=2, clients=100)
    bits, record = elect_bits(t, top=2)
    assert bits == [8, 4] and record["elected"] == [8, 4]


def test_election_follows_the_devices():
    _, t = _topo(edges=2, clients=50, device_mix={"gateway": 1.0})
    assert elect_bits(t, top=2)[0] == [16, 8]
    _, t = _topo(edges=2, clients=50, device_mix={"microcontroller": 1.0})
    assert elect_bits(t, top=2)[0] == [4]


def test_large_population_is_cheap():
    _, t = _topo(edges=10, clients=10_000)
    assert t.num_clients == 10_000 and t.profiles.f_max_ghz.nbytes == 80_000
