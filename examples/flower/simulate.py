"""Run a fedtier experiment under Flower's simulation engine, one Flower node per client.

    python examples/flower/simulate.py bench-fedavg-mnist --set train.rounds=10 eval.every=10
    python examples/flower/simulate.py bench-fedavg-mnist --set train.rounds=10 --compare

prints fedtier's evaluation records (accuracy per bit width) as the Flower run makes them.
``fedtier run`` on the same config trains the same clients with the same local training and
aggregates them the same way, hence reaches the same accuracy; ``--compare`` runs it too
(in this process, after the Flower run) and prints both final accuracies.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
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
    p.add_argument("--compare", action="store_true", help="also run fedtier itself")
    args = p.parse_args()
    cfg = load_config(args.config, args.set)
    start = time.perf_counter()
    flower = simulate(cfg, args.cpus)
    flower_s = time.perf_counter() - start
    for record in flower:
        print(json.dumps({"round": record["round"], "bits": record["bits"]}))
    if args.compare:
        start = time.perf_counter()
        own = fedtier_run(cfg)
        own_s = time.perf_counter() - start
        a, b = (r[-1]["bits"]["32"]["accuracy"] for r in (flower, own))
        print(
            f"final fp32 accuracy after {cfg.train.rounds} rounds: Flower simulation {100 * a:.2f}% "
            f"({flower_s:.0f} s), fedtier run {100 * b:.2f}% ({own_s:.0f} s); "
            f"difference {100 * (a - b):+.2f} points"
        )


def fedtier_run(cfg: Config) -> list[dict[str, Any]]:
    """The evaluation records of fedtier's own run of ``cfg`` (its executor as configured)."""
    from fedtier.data import load_dataset
    from fedtier.experiment import prepare_arm
    from fedtier.local.select import close_executor
    from fedtier.rounds import run_rounds

    records: list[dict[str, Any]] = []
    setup = prepare_arm(cfg, load_dataset(cfg.data.dataset, cfg.data.root, seed=cfg.seed))
    try:
        run_rounds(setup, records.append)
    finally:
        close_executor(setup)
    return records


if __name__ == "__main__":
    main()
