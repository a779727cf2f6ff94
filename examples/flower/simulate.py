"""Run a fedtier experiment under Flower's simulation engine, one Flower node per client.

    python examples/flower/simulate.py bench-fedavg-mnist --set train.rounds=10 eval.every=10

prints fedtier's evaluation records (accuracy per bit width) as the Flower run makes them.
Beside it, ``fedtier run`` on the same config gives the same clients, the same local
training and the same aggregation, hence the same accuracy.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from fedtier.config import Config, load_config
from fedtier.interop.flower import client_app, server_app


def simulate(cfg: Config, num_cpus: int = 2) -> list[dict[str, Any]]:
    """fedtier's ServerApp and ClientApp for ``cfg`` under Flower's simulation engine (Ray,
    ``num_cpus`` CPUs, one per node at a time); returns the evaluation records."""
    from flwr.simulation import run_simulation

    records: list[dict[str, Any]] = []
    run_simulation(
        server_app=server_app(cfg, on_eval=records.append),
        client_app=client_app(cfg),
        num_supernodes=cfg.topology.clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": num_cpus, "logging_level": logging.WARNING},
        },
    )
    return records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("config", help="a preset name or a YAML file")
    p.add_argument("--set", nargs="*", default=[], help="dotted overrides, e.g. train.rounds=10")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the simulation's Ray")
    args = p.parse_args()
    for record in simulate(load_config(args.config, args.set), args.cpus):
        print(json.dumps({"round": record["round"], "bits": record["bits"]}))


if __name__ == "__main__":
    main()
