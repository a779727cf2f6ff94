import numpy as np
import pytest
import torch

from fedtier.data import load_dataset
from fedtier.errors import ConfigError
from fedtier.experiment import prepare_arm
from fedtier.schedules import run_schedule, staleness_weight
from tests.conftest import tiny_config

DIGITS = None


def _run(**overrides):
    global DIGITS
    DIGITS = DIGITS or load_dataset("digits")
    base = {"model.name": "mlp", "model.options": {}, "train.rounds": 4, "eval.every": 2}
    setup = prepare_arm(tiny_config(**{**base, **overrides}), DIGITS)
    evals = []
    w = run_schedule(setup, evals.append)
    return w, evals


def test_staleness_weight_is_fedasyncs_polynomial():
    np.testing.assert_allclose(staleness_weight(np.array([0, 3, 8]), 0.5), [1, 0.5, 1 / 3])
    assert staleness_weight(5, 0.0) == 1.0


@pytest.mark.parametrize("name", ["fedasync", "fedbuff", "gossip"])
def test_schedules_learn_deterministically_and_report_clock_and_staleness(name):
    over = {"schedule.name": name, "schedule.buffer": 3, "schedule.concurrency": 4}
    w1, evals = _run(**over)
    w2, _ = _run(**over)
    assert torch.equal(w1, w2)
    assert [e["round"] for e in evals] == [2, 4]
    assert evals[-1]["bits"]["32"]["accuracy"] > 0.5
    times = [e["costs"]["time_s"] for e in evals]
    assert 0 < times[0] < times[1]
    # as many delivered updates as 4 sync rounds; async also pays for the 3 still in flight
    assert evals[-1]["costs"]["device_rounds"] == 4 * 6 + (3 if name != "gossip" else 0)
    if name != "gossip":
        assert evals[-1]["staleness"]["max"] >= 1  # 4 clients in flight: updates go stale


def test_one_client_in_flight_async_is_sequential_sgd_for_both_rules():
    common = {"schedule.concurrency": 1, "schedule.staleness_exponent": 0.0}
    a, ea = _run(**common, **{"schedule.name": "fedasync", "schedule.mixing": 1.0})
    b, eb = _run(**common, **{"schedule.name": "fedbuff", "schedule.buffer": 1})
    torch.testing.assert_close(a, b)
    assert ea[-1]["staleness"]["max"] == eb[-1]["staleness"]["max"] == 0


def test_time_budget_stops_every_schedule_at_equal_simulated_time():
    for name in ("sync", "fedasync", "gossip"):
        _, full = _run(**{"schedule.name": name})
        budget = full[-1]["costs"]["time_s"] / 2
        _, cut = _run(**{"schedule.name": name, "schedule.time_budget_s": budget})
        assert cut[-1]["costs"]["time_s"] < full[-1]["costs"]["time_s"]
        if name == "fedasync":
            assert cut[-1]["costs"]["time_s"] <= budget
        else:  # sync stops at the first round ending at or after the budget
            assert cut[-1]["costs"]["time_s"] >= budget


@pytest.mark.parametrize(
    "key,value", [("schedule.name", "gosip"), ("schedule.mixing", 1.5), ("schedule.buffer", 0)]
)
def test_schedule_config_errors_name_the_field(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        tiny_config(**{key: value})


def test_gossip_with_every_peer_and_a_consensus_each_round_is_the_synchronous_mean():
    common = {"aggregate.rule": "qafed", "train.rounds": 2}
    sync, _ = _run(**common)
    gossip, _ = _run(
        **common,
        **{"schedule.name": "gossip", "schedule.peers": 10, "schedule.cloud_every": 1},
    )
    torch.testing.assert_close(gossip, sync, rtol=1e-5, atol=1e-6)


def test_a_client_without_a_model_pulls_the_mean_of_its_edge_peers():
    import numpy as np

    from fedtier.schedules import _gossip_start

    w = torch.zeros(3)
    models = {1: torch.ones(3), 2: 3 * torch.ones(3), 7: 100 * torch.ones(3)}  # 7: other edge
    rng = np.random.default_rng(0)
    assert torch.equal(_gossip_start(models, 1, {0, 1, 2}, 2, w, rng), torch.ones(3))  # own
    torch.testing.assert_close(_gossip_start(models, 0, {0, 1, 2}, 2, w, rng), 2 * torch.ones(3))
    assert torch.equal(_gossip_start(models, 0, {0, 1, 2}, 0, w, rng), w)  # no peers: w
    assert torch.equal(_gossip_start({}, 0, {0, 1, 2}, 2, w, rng), w)  # nobody trained yet
