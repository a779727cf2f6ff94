"""fedtier under Flower's simulation engine: the example app gives ``fedtier run``'s numbers,
a robust rule (Krum) runs as a Flower strategy, and its precondition error reaches the user."""

import importlib.util
import logging
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict

from fedtier.config import load_config
from fedtier.data import load_dataset
from fedtier.errors import ConfigError, FedtierError
from fedtier.experiment import prepare_arm
from fedtier.interop.flower import (
    STATE_KEY,
    TierStrategy,
    config_from_run,
    device_update,
    flat_config,
)
from fedtier.local.arm import train_sequential
from tests.conftest import tiny_config

EXAMPLE = Path(__file__).parents[2] / "examples" / "flower" / "simulate.py"
_spec = importlib.util.spec_from_file_location("flower_example", EXAMPLE)
assert _spec is not None and _spec.loader is not None
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)

DIGITS = load_dataset("digits")

# bench-fedavg-mnist shrunk: digits, 12 clients (4 per round), 2 rounds of 1 local epoch
SHRUNK = [
    "data.dataset=digits",
    "topology.clients=12",
    "topology.clients_per_edge=4",
    "train.rounds=2",
    "train.epochs=1",
    "eval.every=1",
]


@pytest.fixture(autouse=True)
def quiet_flower():
    logging.getLogger("flwr").setLevel(logging.WARNING)


def fedtier_run(cfg):
    """``fedtier run``'s evaluation records for ``cfg`` (the sequential executor)."""
    return example.fedtier_run(flat_config(cfg))


def assert_same_run(flower, fedtier):
    assert [r["round"] for r in flower] == [r["round"] for r in fedtier]
    for a, b in zip(flower, fedtier):
        assert a["bits"]["32"]["accuracy"] == pytest.approx(b["bits"]["32"]["accuracy"], abs=0.01)
        assert a["stages"] == pytest.approx(b["stages"])


def test_the_example_app_on_bench_fedavg_mnist_matches_fedtier_run():
    cfg = load_config("bench-fedavg-mnist", SHRUNK)
    flower = example.simulate(cfg, num_cpus=2)
    fedtier = fedtier_run(cfg)
    assert len(flower) == 2
    assert fedtier[-1]["bits"]["32"]["accuracy"] > 0.2  # it trained (10 classes: chance 0.1)
    assert_same_run(flower, fedtier)


def test_krum_runs_as_a_flower_strategy():
    """Krum (f = 1) at each of the 2 edges over 5 clients: 4 of 5 uploads rejected per edge,
    and the same model as fedtier's own run."""
    cfg = tiny_config(
        **{
            "aggregate.edge_rule": {"name": "krum", "f": 1},
            "aggregate.edge_rounds": 1,
            "topology.clients_per_edge": 5,
            "train.rounds": 1,
        }
    )
    flower = example.simulate(cfg, num_cpus=1)
    assert flower[-1]["stages"]["edge/rejected"] == 8
    assert_same_run(flower, fedtier_run(cfg))


def test_a_rule_precondition_surfaces_through_flower():
    """Krum with f = 1 over 3 clients per edge (it needs n > 2f + 2): the strategy refuses
    it when made, and a Flower run stops with that error, raised to the caller."""
    cfg = tiny_config(
        **{
            "aggregate.edge_rule": {"name": "krum", "f": 1},
            "aggregate.edge_rounds": 1,
            "train.rounds": 1,
        }
    )
    message = r"'aggregate.edge_rule'.*krum needs n > 2f \+ 2 .* got n=3 with f=1"
    with pytest.raises(ConfigError, match=message):
        TierStrategy(prepare_arm(flat_config(cfg), DIGITS))
    with pytest.raises(ConfigError, match=message):
        example.simulate(cfg, num_cpus=1)


def test_flat_rounds_refuse_what_flower_cannot_run():
    with pytest.raises(ConfigError, match="aggregate.edge_rounds"):
        flat_config(tiny_config(**{"aggregate.edge_rounds": 2}))
    with pytest.raises(ConfigError, match="arms"):
        flat_config(tiny_config(**{"aggregate.edge_rounds": 1, "arms": {"a": {}, "b": {}}}))
    with pytest.raises(ConfigError, match="aggregate.secure"):
        flat_config(tiny_config(**{"aggregate.edge_rounds": 1, "aggregate.secure": "secagg"}))
    assert flat_config(tiny_config(**{"aggregate.edge_rounds": 1})).train.executor == "sequential"


def test_the_run_config_names_the_experiment():
    def context(run_config):
        return Context(
            run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
        )

    cfg = config_from_run(
        context({"fedtier-config": "bench-fedavg-mnist", "fedtier-set": "train.rounds=3; seed=4"})
    )
    assert cfg.name == "bench-fedavg-mnist" and cfg.train.rounds == 3 and cfg.seed == 4
    with pytest.raises(FedtierError, match="fedtier-config"):
        config_from_run(context({}))


def test_a_node_keeps_its_fedbn_state_in_its_flower_context():
    """FedBN: a device's BatchNorm state survives from one message to the next only through
    the node's Context.state (the node's process is cleared in between), and the device's
    deltas equal fedtier's sequential executor's, which keeps that state in the arm."""
    cfg = flat_config(tiny_config(**{"model.batchnorm": "local", "aggregate.edge_rounds": 1}))
    node, reference = prepare_arm(cfg, DIGITS), prepare_arm(cfg, DIGITS)
    w = reference.layout.flatten(reference.model)
    kept = RecordDict()
    for step in (0, 1):
        delta, metrics = device_update(node, w, 5, 0, step, kept)
        node.local_state.clear()  # another node's message may come next to this process
        assert torch.equal(delta, train_sequential(reference, w, [5], step)[0])
    assert STATE_KEY in kept and metrics["num-examples"] == reference.topology.num_samples[5]
    forgetful, _ = device_update(node, w, 5, 0, 1, RecordDict())
    assert not torch.equal(forgetful, delta)
