"""The cost model of a run: device columns, the simulated clock, and the byte ledger.

:class:`CostModel` turns what a round really did — who trained on how many samples, how many
bytes each client's codec produced — into time and energy with SS-Diff's model
(:mod:`fedtier.costs.wireless`), and keeps the totals the results report:

* bytes per tier and direction: client→edge (the real encoded payload), edge→cloud (the
  edge's fp32 update), cloud→edge and edge→client (the fp32 global model), and per client;
* the simulated clock: a synchronous round lasts as long as its slowest scheduled device,
  edges running in parallel; with a deadline and ``stragglers: drop`` a device that misses
  T_max is left out of its edge's aggregate and the round lasts T_max;
* energy: Σ over scheduled devices of E^cmp + E^com at the allocated (f_j, P_j).

OFDMA: an edge has ``resource_blocks`` blocks (0 = one per scheduled device). Devices beyond
them either wait for a block to free up (``overflow: wait``; served in order of finishing
their computation) or are not scheduled that round (``overflow: drop``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedtier.config import CostConfig
from fedtier.costs.wireless import Allocation, allocate_min_energy, device_costs, snr_gain
from fedtier.topology import DEVICE_CLASSES, Topology


@dataclass
class EdgeCosts:
    """Costs of one edge's clients in one edge round (arrays [C] in the clients' order)."""

    allocation: Allocation
    finish_s: np.ndarray  # when each client's upload completes (waiting for a block included)
    kept: np.ndarray  # bool: its update reaches the aggregate

    @property
    def time_s(self) -> float:
        return float(self.finish_s[self.kept].max()) if self.kept.any() else 0.0


@dataclass
class CostLedger:
    """What the cost model has counted so far: the run's state of the cost model (it lives in
    :class:`fedtier.rounds.RunState` and is saved with every checkpoint)."""

    totals: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    client_bytes: dict[int, float] = field(default_factory=lambda: defaultdict(float))
    edge_time: dict[int, float] = field(default_factory=lambda: defaultdict(float))
    edge_time_max: dict[int, float] = field(default_factory=lambda: defaultdict(float))

    def to_dict(self) -> dict[str, dict]:
        return {k: dict(getattr(self, k)) for k in LEDGER_FIELDS}

    @classmethod
    def from_dict(cls, d: dict[str, dict]) -> CostLedger:
        ledger = cls()
        for k in LEDGER_FIELDS:
            getattr(ledger, k).update(d.get(k, {}))
        return ledger


LEDGER_FIELDS = ("totals", "client_bytes", "edge_time", "edge_time_max")


@dataclass
class CostModel:
    cfg: CostConfig
    topology: Topology
    epochs: int
    param_count: int  # P: floats in the global model (downlink size)
    ledger: CostLedger = field(default_factory=CostLedger)  # bound to the run's state
    # C for every device (cycles per training sample, e.g. the model's counted FLOPs over the
    # FLOPs per cycle); None: each device class's own constant
    sample_cycles: float | None = None

    @property
    def totals(self) -> dict[str, float]:
        return self.ledger.totals

    @property
    def client_bytes(self) -> dict[int, float]:
        return self.ledger.client_bytes

    def __post_init__(self) -> None:
        prof, c = self.topology.profiles, self.cfg
        classes = [DEVICE_CLASSES[prof.kinds[k]] for k in prof.kind]
        self.f_max_hz = prof.f_max_ghz * 1e9
        self.cycles_per_sample = np.array(
            [
                d.cycles_per_sample if self.sample_cycles is None else self.sample_cycles
                for d in classes
            ]
        )
        self.capacitance = np.array([d.capacitance for d in classes])
        self.p_max_w = np.array([d.p_max_w for d in classes])
        self.gain = snr_gain(
            prof.channel_gain,
            prof.distance_m,
            c.path_loss_exponent,
            c.bandwidth_hz,
            c.noise_dbm_hz,
        )

    # ----------------------------------------------------------------- per device

    def cycles(self, clients: list[int]) -> np.ndarray:
        """c_j = C · D_j · I (cycles per sample × local samples × local epochs)."""
        idx = np.asarray(clients)
        return self.cycles_per_sample[idx] * self.topology.num_samples[idx] * self.epochs

    def allocate(
        self, clients: list[int], payload_bits: np.ndarray, policy: str | None = None
    ) -> Allocation:
        """(f_j, P_j) by ``policy`` (default: the configured one): ``max`` (f_max, P_max) or
        ``optimal`` (energy-minimising under the deadline)."""
        idx = np.asarray(clients)
        args = (
            self.cycles(clients),
            self.capacitance[idx],
            self.f_max_hz[idx],
            self.gain[idx],
            self.p_max_w[idx],
            np.asarray(payload_bits, dtype=np.float64),
            self.cfg.bandwidth_hz,
        )
        if (policy or self.cfg.allocation) == "optimal":
            assert self.cfg.deadline_s is not None  # validated in config
            return allocate_min_energy(*args, self.cfg.deadline_s)
        return device_costs(*args, self.cfg.deadline_s)

    def payload_budget_bits(self, clients: list[int], d: int) -> np.ndarray:
        """Bits each device can send at P_max in what the deadline leaves after computing at
        f_max (its "current resources" in SS-Diff's dynamic quantization); without a
        deadline, unlimited."""
        if self.cfg.deadline_s is None:
            return np.full(len(clients), np.inf)
        idx = np.asarray(clients)
        left = self.cfg.deadline_s - self.cycles(clients) / self.f_max_hz[idx]
        rate = self.cfg.bandwidth_hz * np.log2(1 + self.gain[idx] * self.p_max_w[idx])
        return np.maximum(left, 0.0) * rate

    # ----------------------------------------------------------------- scheduling

    def schedule(self, clients: list[int]) -> list[int]:
        """The sampled clients that get a resource block (all, unless ``overflow: drop``)."""
        n = self.cfg.resource_blocks
        if self.cfg.overflow == "drop" and 0 < n < len(clients):
            self.totals["unscheduled"] += len(clients) - n
            return clients[:n]
        return clients

    def edge_round(
        self, edge: int, clients: list[int], payload_bytes: dict[int, int], uploaded: int
    ) -> EdgeCosts:
        """Account one edge round: time, energy and bytes of ``clients`` (uploading ``uploaded``
        floats each unless a codec recorded its payload). Returns which updates are kept."""
        sizes = np.array([payload_bytes.get(c, 4 * uploaded) for c in clients], dtype=float)
        alloc = self.allocate(clients, 8 * sizes)
        finish = self._finish_times(alloc)
        kept = np.ones(len(clients), dtype=bool)
        if self.cfg.deadline_s is not None and self.cfg.stragglers == "drop":
            kept = finish <= self.cfg.deadline_s * (1 + 1e-9)
        out = EdgeCosts(alloc, finish, kept)
        edge_time = self.cfg.deadline_s if not kept.all() else out.time_s
        self.ledger.edge_time[edge] += float(
            edge_time or 0.0
        )  # κ edge rounds run one after another
        t = self.totals
        t["energy_j"] += float(alloc.energy.sum())
        if self.cfg.allocation == "optimal":
            # the same devices and payloads at (f_max, P_max): the default policy's cost,
            # reported beside the optimum so the saving is paired exactly
            at_max = self.allocate(clients, 8 * sizes, policy="max")
            t["energy_at_max_j"] += float(at_max.energy.sum())
            self.ledger.edge_time_max[edge] += float(self._finish_times(at_max).max(initial=0.0))
        t["energy_cmp_j"] += float(alloc.e_cmp.sum())
        t["energy_com_j"] += float(alloc.e_com.sum())
        t["infeasible"] += float((~alloc.feasible).sum())
        t["dropped"] += float((~kept).sum())
        t["device_rounds"] += len(clients)
        t["bytes_client_edge"] += float(sizes.sum())
        t["bytes_edge_client"] += 4.0 * self.param_count * len(clients)
        t[f"bytes_edge{edge}_up"] += float(sizes.sum())
        for c, s in zip(clients, sizes):
            self.client_bytes[c] += float(s)
        return out

    def protocol_bytes(self, name: str, up: dict[str, float], down: dict[str, float]) -> None:
        """Count a protocol's traffic by phase (secure aggregation's key exchange, shares and
        masked inputs: ``bytes_<name>_<phase>_up`` / ``_down``, and ``bytes_<name>_up`` /
        ``_down`` in all). Kept apart from ``bytes_client_edge``, the codec payload that
        the radio model prices; not on the simulated clock."""
        t = self.totals
        for direction, phases in (("up", up), ("down", down)):
            for phase, b in phases.items():
                t[f"bytes_{name}_{phase}_{direction}"] += float(b)
                t[f"bytes_{name}_{direction}"] += float(b)

    def _finish_times(self, alloc: Allocation) -> np.ndarray:
        """Upload completion per device; with fewer blocks than devices (``overflow: wait``)
        a device transmits once its computation is done and a block is free."""
        n = self.cfg.resource_blocks
        ready = alloc.t_cmp
        if n <= 0 or n >= len(ready):
            return ready + alloc.t_com
        free = np.zeros(n)
        finish = np.empty_like(ready)
        for j in np.argsort(ready, kind="stable"):
            b = int(np.argmin(free))
            finish[j] = max(ready[j], free[b]) + alloc.t_com[j]
            free[b] = finish[j]
        return finish

    def cloud_round(
        self,
        edges: int,
        clock: bool = True,
        up_bytes: float | None = None,
        down_bytes: float | None = None,
    ) -> None:
        """Close a cloud round: edge↔cloud traffic (fp32 of the global model per edge, unless
        ``up_bytes`` / ``down_bytes`` give the round's totals, e.g. encoded generator uploads)
        and, with ``clock``, the round's simulated time."""
        t = self.totals
        fp32 = 4.0 * self.param_count * edges
        t["bytes_edge_cloud"] += fp32 if up_bytes is None else float(up_bytes)
        t["bytes_cloud_edge"] += fp32 if down_bytes is None else float(down_bytes)
        if not clock:
            return
        t["time_s"] += max(self.ledger.edge_time.values(), default=0.0)  # edges run in parallel
        if self.ledger.edge_time_max:
            t["time_at_max_s"] += max(self.ledger.edge_time_max.values())
        t["rounds"] += 1
        self.ledger.edge_time.clear()
        self.ledger.edge_time_max.clear()

    def relay(
        self, now: float, up_bytes: float | None = None, down_bytes: float | None = None
    ) -> None:
        """Asynchronous schedules: an edge relays one update to the cloud (fp32, or
        ``up_bytes``) and the cloud's new model back (fp32, or ``down_bytes``); the clock is
        the event time ``now``."""
        t = self.totals
        t["bytes_edge_cloud"] += 4.0 * self.param_count if up_bytes is None else float(up_bytes)
        t["bytes_cloud_edge"] += 4.0 * self.param_count if down_bytes is None else float(down_bytes)
        t["time_s"] = now
        self.ledger.edge_time.clear()
        self.ledger.edge_time_max.clear()

    def snapshot(self) -> dict[str, Any]:
        """Cumulative totals so far (logged with each evaluation)."""
        out: dict[str, Any] = {k: round(v, 6) for k, v in sorted(self.totals.items())}
        out["bytes_up"] = out.get("bytes_client_edge", 0.0) + out.get("bytes_edge_cloud", 0.0)
        out["bytes_down"] = out.get("bytes_cloud_edge", 0.0) + out.get("bytes_edge_client", 0.0)
        if self.client_bytes:
            per = np.array(list(self.client_bytes.values()))
            out["client_bytes_mean"] = float(per.mean())
            out["client_bytes_max"] = float(per.max())
        return out
