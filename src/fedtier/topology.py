"""Three tiers as plain data: edges → clients, device profiles, and per-round plans.

Device profiles are stored column-wise (one NumPy array per attribute) so that a population
of 10,000 clients costs a few hundred kilobytes, not 10,000 objects. A :class:`RoundPlan`
says which edges and clients take part in a round; it is derived from the seed and the round
number only, so it can be logged and replayed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from fedtier.config import TopologyConfig
from fedtier.seeding import numpy_rng


@dataclass(frozen=True)
class DeviceClass:
    """A kind of end device. Values follow the ranges used in SS-Diff's simulations."""

    preferred_bits: tuple[int, ...]  # bit widths the device can run its model at, best first
    f_max_ghz: float  # CPU frequency limit
    cycles_per_sample: float  # C: CPU cycles to process one sample once
    capacitance: float  # τ: effective switched capacitance (E = τ C D I f²)
    p_max_w: float  # transmit power limit


DEVICE_CLASSES: dict[str, DeviceClass] = {
    "microcontroller": DeviceClass((4,), 0.5, 2e7, 1e-28, 0.1),
    "embedded": DeviceClass((8,), 1.0, 2e7, 1e-28, 0.2),
    "smartphone": DeviceClass((8, 4), 2.0, 2e7, 2e-28, 0.2),
    "gateway": DeviceClass((16, 8), 3.0, 2e7, 2e-28, 0.5),
}


@dataclass
class DeviceProfiles:
    """Column-wise device attributes, indexed by client id."""

    kind: np.ndarray  # [N] index into ``kinds``
    kinds: list[str]
    f_max_ghz: np.ndarray  # [N]
    distance_m: np.ndarray  # [N] distance to the edge server
    channel_gain: np.ndarray  # [N] small-scale fading gain H

    def preferred_bits(self, client: int) -> tuple[int, ...]:
        return DEVICE_CLASSES[self.kinds[self.kind[client]]].preferred_bits


@dataclass
class Topology:
    """K edges; ``edge_clients[k]`` lists the client ids served by edge k."""

    edge_clients: list[np.ndarray]
    profiles: DeviceProfiles
    num_samples: np.ndarray  # [N] size of each client's data set

    @property
    def num_clients(self) -> int:
        return int(sum(len(c) for c in self.edge_clients))

    @property
    def num_edges(self) -> int:
        return len(self.edge_clients)


def build_topology(
    cfg: TopologyConfig,
    num_samples: np.ndarray,
    seed: int,
    edge_of_client: np.ndarray | None = None,
) -> Topology:
    """Spread cfg.clients over cfg.edges (contiguous blocks, or ``edge_of_client`` when a
    region-level partition fixes it) and draw device profiles from ``cfg.device_mix``."""
    n, k = cfg.clients, cfg.edges
    rng = numpy_rng(seed, "topology")
    if edge_of_client is None:
        edge_of_client = np.repeat(np.arange(k), [len(a) for a in np.array_split(np.arange(n), k)])
    edge_clients = [np.flatnonzero(edge_of_client == e) for e in range(k)]
    kinds = list(cfg.device_mix)
    shares = np.array([cfg.device_mix[c] for c in kinds], dtype=float)
    kind = rng.choice(len(kinds), size=n, p=shares / shares.sum())
    profiles = DeviceProfiles(
        kind=kind,
        kinds=kinds,
        f_max_ghz=np.array([DEVICE_CLASSES[kinds[i]].f_max_ghz for i in kind]),
        distance_m=rng.uniform(10.0, 200.0, size=n),
        channel_gain=rng.exponential(1.0, size=n),
    )
    return Topology(edge_clients, profiles, np.asarray(num_samples))


@dataclass
class RoundPlan:
    """Who takes part in round ``round``: ``edges[e]`` = sampled client ids of edge e.

    ``round`` is the 0-based round index the plan is drawn from (it seeds the sampling);
    the logged form, :meth:`to_dict`, counts rounds from 1 like metrics.jsonl does."""

    round: int
    edges: dict[int, list[int]] = field(default_factory=dict)

    @property
    def clients(self) -> list[int]:
        return [c for cs in self.edges.values() for c in cs]

    def to_dict(self) -> dict:
        """The plan as logged in metrics.jsonl: ``round`` = the number of completed cloud
        rounds once this plan has run (index + 1, the record's own ``round``)."""
        return {**asdict(self), "round": self.round + 1}


def _count(spec: float, total: int) -> int:
    """A count (spec >= 1) or a fraction (spec < 1) of ``total``, at least 1, at most total."""
    n = int(spec) if spec >= 1 else int(round(spec * total))
    return max(1, min(total, n))


def plan_round(
    topology: Topology, cfg: TopologyConfig, seed: int, round_: int, poisson: bool = False
) -> RoundPlan:
    """Sample edges (fixed-size, without replacement), then clients within each sampled edge;
    seeded by (seed, round) only.

    Clients are drawn fixed-size without replacement, or, with ``poisson`` (the DP arms),
    each client of a sampled edge independently with probability q_e = :func:`sample_rate`
    (Poisson sampling, the sampling the RDP accountant analyses; Mironov et al. 2019), from
    the stream (seed, round, edge): the sample varies in size and may be empty.
    """
    rng = numpy_rng(seed, "plan", round_)
    edges = np.sort(
        rng.choice(
            topology.num_edges, _count(cfg.edges_per_round, topology.num_edges), replace=False
        )
    )
    plan = RoundPlan(round_)
    for e in edges:
        pool = topology.edge_clients[e]
        if poisson:
            draw = numpy_rng(seed, "poisson", round_, int(e)).random(len(pool))
            chosen = pool[draw < sample_rate(topology, cfg, int(e))]
        else:
            chosen = rng.choice(pool, _count(cfg.clients_per_edge, len(pool)), replace=False)
        plan.edges[int(e)] = sorted(int(c) for c in chosen)
    return plan


def expected_clients(topology: Topology, cfg: TopologyConfig, edge: int) -> int:
    """Clients of ``edge`` sampled per round (fixed-size), or their expected number q_e N_e
    under Poisson sampling: the same number, so both samplings train as many on average."""
    return _count(cfg.clients_per_edge, len(topology.edge_clients[edge]))


def sample_rate(topology: Topology, cfg: TopologyConfig, edge: int) -> float:
    """q_e: the probability that a client of a sampled ``edge`` is sampled in a round."""
    return expected_clients(topology, cfg, edge) / len(topology.edge_clients[edge])


def expected_sampled(topology: Topology, cfg: TopologyConfig) -> float:
    """Mean number of clients per round (used by QAFed's default η_s = N / sampled)."""
    per_edge = np.mean([_count(cfg.clients_per_edge, len(c)) for c in topology.edge_clients])
    return float(_count(cfg.edges_per_round, topology.num_edges) * per_edge)
