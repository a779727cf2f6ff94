"""The dense executor (first layer in sample space) agrees with the sequential reference."""

import pytest
import torch
from torch import nn

from fedtier.data import load_dataset
from fedtier.experiment import prepare_arm
from fedtier.local.arm import train_sequential
from fedtier.local.dense import dense_stack, not_dense, sample_space_pays, train_dense
from fedtier.local.select import choose_executor
from fedtier.rounds import run_rounds
from tests.conftest import tiny_config

DIGITS = load_dataset("digits")
PLAIN_MLP = {
    "model.name": "mlp",
    "model.options": {"hidden": 32},
    "train.momentum": 0.0,
    "train.batch_size": 8,
    "train.epochs": 2,
}
MANY_SMALL_CLIENTS = {"topology.clients": 200, "topology.clients_per_edge": 5}


def tanh_mlp(input_shape, num_classes):
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 24), nn.Tanh(), nn.Linear(24, 12), nn.GELU(), nn.Linear(12, 10)
    )


def inplace_mlp(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(inplace=True), nn.Linear(16, 10))


def _setup(**overrides):
    return prepare_arm(tiny_config(**{**PLAIN_MLP, **overrides}), DIGITS)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"model.name": "tests.local.test_dense:tanh_mlp", "model.options": {}},
        {"model.name": "tests.local.test_dense:inplace_mlp", "model.options": {}},
        {"model.options": {"layers": []}},  # logistic regression: one Linear layer
    ],
    ids=["relu mlp", "tanh-gelu mlp", "in-place relu", "logistic regression"],
)
def test_dense_deltas_equal_sequential_ones(overrides):
    setup = _setup(**overrides)
    clients = [0, 3, 5, 7, 11]  # unequal sizes: different step counts and short last batches
    sizes = {int(setup.topology.num_samples[c]) for c in clients}
    assert len(sizes) > 1
    w = setup.layout.flatten(setup.model)
    seq = train_sequential(setup, w, clients, 3)
    dense = train_dense(setup, w, clients, 3)
    assert seq.abs().max() > 1e-3  # training moved the clients
    torch.testing.assert_close(dense, seq, atol=1e-5, rtol=1e-4)


def test_a_clients_result_does_not_depend_on_who_shares_its_block():
    setup = _setup()
    w = setup.layout.flatten(setup.model)
    together = train_dense(setup, w, [2, 4, 9], step=1)
    alone = train_dense(setup, w, [4], step=1)
    torch.testing.assert_close(together[1], alone[0], atol=1e-6, rtol=0)


def test_whole_run_matches_sequential_and_auto_picks_dense():
    results = {}
    for executor in ("sequential", "auto"):
        setup = _setup(**MANY_SMALL_CLIENTS, **{"train.rounds": 2, "train.executor": executor})
        results[setup.executor_name] = run_rounds(setup, lambda record: None)
    assert set(results) == {"sequential", "dense"}
    torch.testing.assert_close(results["dense"], results["sequential"], atol=1e-5, rtol=1e-4)


def test_sample_space_pays_for_small_clients_only():
    assert sample_space_pays(8, 784, 100, epochs=5)  # bench-small-mnist's clients
    assert sample_space_pays(500, 784, 100, epochs=5)
    assert not sample_space_pays(600, 784, 100, epochs=5)
    assert not sample_space_pays(100, 784, 100, epochs=1)


def test_dense_stack_recognises_linear_stacks_only():
    stack = dense_stack(tanh_mlp((1, 8, 8), 10))
    assert not isinstance(stack, str)
    assert stack.flatten and len(stack.linears) == 3 and len(stack.activations) == 2
    assert "not an nn.Sequential" in dense_stack(nn.Linear(4, 2))
    assert "not Linear layers" in dense_stack(nn.Sequential(nn.Linear(4, 4), nn.Dropout()))
    assert "end with a Linear" in dense_stack(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"model.name": "cnn", "model.options": {}}, "not Linear layers"),
        ({"train.momentum": 0.9}, "momentum"),
        ({"quant.qat": True}, "cross-entropy"),
        ({"train.precision": "bf16"}, "bf16"),
        ({}, "too large"),  # ~150 samples per client against 64 inputs
    ],
)
def test_not_dense_says_why(overrides, reason):
    small = {} if reason == "too large" else MANY_SMALL_CLIENTS
    assert reason in not_dense(_setup(**small, **overrides))


def test_selection_of_dense_and_its_fallback():
    assert choose_executor(_setup(**MANY_SMALL_CLIENTS)) == (
        "dense",
        "the model is Linear layers trained with plain SGD and the clients are small: "
        "first layer in sample space",
    )
    name, why = choose_executor(_setup(**{"train.executor": "dense", "train.momentum": 0.5}))
    assert name == "vectorised" and "'dense' but local SGD has momentum" in why
    assert choose_executor(_setup())[0] == "vectorised"  # large clients
