"""Election of the target bit set B before training (QAFed §3.1).

Each edge recommends bit widths from its clients' device profiles (the share of its clients
that can run each width); the cloud weighs each edge's recommendation by
(number of devices × mean compute × data quality) and keeps the ``top`` widths with the
largest weighted vote. Data quality defaults to the edge's share of all training samples.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from fedtier.topology import Topology


def edge_recommendations(topology: Topology) -> list[dict[int, float]]:
    """Per edge: bit width → share of its clients that list it among their preferred widths."""
    out = []
    for clients in topology.edge_clients:
        votes: dict[int, float] = defaultdict(float)
        for c in clients:
            for b in topology.profiles.preferred_bits(int(c)):
                votes[b] += 1.0 / len(clients)
        out.append(dict(votes))
    return out


def elect_bits(topology: Topology, top: int = 2) -> tuple[list[int], dict]:
    """Return (B sorted descending, a log record with each edge's weight and the tally)."""
    recs = edge_recommendations(topology)
    total_samples = float(topology.num_samples.sum())
    tally: dict[int, float] = defaultdict(float)
    weights = []
    for clients, rec in zip(topology.edge_clients, recs):
        quality = float(topology.num_samples[clients].sum()) / total_samples
        compute = float(np.mean(topology.profiles.f_max_ghz[clients]))
        weight = len(clients) * compute * quality
        weights.append(weight)
        for b, share in rec.items():
            tally[b] += weight * share
    ranked = sorted(tally, key=lambda b: (-tally[b], -b))
    bits = sorted(ranked[:top], reverse=True)
    record = {
        "edge_weights": weights,
        "edge_recommendations": [{str(b): round(s, 4) for b, s in r.items()} for r in recs],
        "tally": {str(b): round(v, 4) for b, v in sorted(tally.items())},
        "elected": bits,
    }
    return bits, record
