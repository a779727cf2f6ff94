"""The vectorised executor agrees with the sequential reference (FedJAX's for_each_client test)."""

import logging

import pytest
import torch
from torch import nn

from fedtier.data import load_dataset
from fedtier.experiment import prepare_arm
from fedtier.local.arm import train_sequential
from fedtier.local.select import choose_executor
from fedtier.local.vectorised import not_vectorisable, train_vectorised
from fedtier.rounds import run_rounds
from tests.conftest import tiny_config

DIGITS = load_dataset("digits")


def _setup(**overrides):
    return prepare_arm(tiny_config(**overrides), DIGITS)


def _both(setup, clients, step=3):
    w = setup.layout.flatten(setup.model)
    seq = train_sequential(setup, w, clients, step)
    vec = train_vectorised(setup, w, clients, step)
    return seq, vec


CASES = {
    "mlp, momentum, weight decay": {
        "model.name": "mlp",
        "model.options": {"hidden": 32},
        "train.weight_decay": 1e-3,
        "train.epochs": 2,
    },
    "mlp, qat": {"model.name": "mlp", "model.options": {"hidden": 32}, "quant.qat": True},
    "batchnorm cnn": {"train.momentum": 0.0},
    "autoencoder": {
        "model.name": "autoencoder",
        "model.options": {"hidden": 16, "latent": 4},
        "train.task": "autoencoder",
    },
    "diffusion": {
        "model.name": "denoiser-mlp",
        "model.options": {"hidden": 16, "embed": 8},
        "train.task": "diffusion-test",
        "train.epochs": 2,
    },
    "diffusion, qat": {
        "model.name": "denoiser-mlp",
        "model.options": {"hidden": 16, "embed": 8},
        "train.task": "diffusion-test",
        "quant.qat": True,
        "quant.bits": [8, 4],
    },
}


@pytest.mark.parametrize("case", CASES)
def test_vectorised_deltas_equal_sequential_ones(case):
    setup = _setup(**{"train.batch_size": 8, **CASES[case]})
    clients = [0, 3, 5, 7, 11]  # unequal sizes: different step counts and short last batches
    sizes = {int(setup.topology.num_samples[c]) for c in clients}
    assert len(sizes) > 1
    assert not_vectorisable(setup, clients) is None  # really vectorised, no fallback
    seq, vec = _both(setup, clients)
    assert seq.shape == vec.shape == (len(clients), setup.layout.size)
    assert seq.abs().max() > 1e-3  # training moved the clients
    torch.testing.assert_close(vec, seq, atol=1e-5, rtol=1e-4)


def test_batchnorm_qat_step_with_per_bit_statistics_agrees():
    # QAT is discontinuous in w (rounding): perturbing w by 1e-7 moves a BatchNorm QAT client
    # by ~1e-2 after a few steps in either executor, so agreement to 1e-5 is checked on one
    # step per client (one batch each, of unequal lengths: the grouped path).
    setup = _setup(
        **{"quant.qat": True, "quant.bits": [4], "train.batch_size": 512, "train.epochs": 1}
    )
    assert any(n.endswith("running_mean_q4") for n in setup.layout.names)
    seq, vec = _both(setup, [0, 3, 5])
    assert seq.abs().max() > 1e-3
    torch.testing.assert_close(vec, seq, atol=1e-5, rtol=1e-4)


def test_a_clients_result_does_not_depend_on_who_shares_its_block():
    setup = _setup(**{"model.name": "mlp", "model.options": {}, "train.batch_size": 8})
    w = setup.layout.flatten(setup.model)
    together = train_vectorised(setup, w, [2, 4, 9], step=1)
    alone = train_vectorised(setup, w, [4], step=1)
    torch.testing.assert_close(together[1], alone[0], atol=1e-6, rtol=0)


def test_fedbn_keeps_device_state_like_the_sequential_executor():
    seq_setup = _setup(**{"model.batchnorm": "local"})
    vec_setup = _setup(**{"model.batchnorm": "local"})
    w = seq_setup.layout.flatten(seq_setup.model)
    seq = train_sequential(seq_setup, w, [1, 6], 0)
    vec = train_vectorised(vec_setup, w, [1, 6], 0)
    torch.testing.assert_close(vec, seq, atol=1e-5, rtol=1e-4)
    assert set(vec_setup.local_state) == {1, 6}
    for c in (1, 6):
        torch.testing.assert_close(
            vec_setup.local_state[c], seq_setup.local_state[c], atol=1e-5, rtol=1e-4
        )


def test_whole_run_matches_sequential():
    base = {"model.name": "mlp", "model.options": {}, "train.rounds": 2}
    results = {}
    for executor in ("sequential", "vectorised"):
        setup = _setup(**base, **{"train.executor": executor})
        assert setup.executor_name == executor
        evals: list[dict] = []
        results[executor] = run_rounds(setup, evals.append)
    torch.testing.assert_close(results["vectorised"], results["sequential"], atol=1e-5, rtol=1e-4)


DROPOUT_MLP = "tests.local.test_vectorised:dropout_mlp"


def dropout_mlp(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Dropout(0.5), nn.Linear(16, 10))


def test_dropout_model_falls_back_to_sequential_saying_why_once(caplog, monkeypatch):
    from fedtier.local import messages

    # independent of the tests before: nothing said yet, and records reach caplog even after
    # the CLI's show_log() stopped the "fedtier" logger from propagating
    monkeypatch.setattr(messages, "_said", set())
    monkeypatch.setattr(logging.getLogger("fedtier"), "propagate", True)
    setup = _setup(**{"model.name": DROPOUT_MLP, "model.options": {}})
    assert "dropout" in not_vectorisable(setup)
    w = setup.layout.flatten(setup.model)
    with caplog.at_level(logging.WARNING, logger="fedtier"):
        torch.manual_seed(0)
        vec = train_vectorised(setup, w, [0, 1], 0)
        train_vectorised(setup, w, [0, 1], 0)
    torch.manual_seed(0)
    seq = train_sequential(setup, w, [0, 1], 0)
    torch.testing.assert_close(vec, seq)
    said = [r.message for r in caplog.records if "falling back" in r.message]
    assert len(said) == 1 and "dropout" in said[0]


def test_clients_with_their_own_task_fall_back():
    setup = _setup(**{"model.name": "mlp", "model.options": {}})
    other = object()
    setup.task_of = lambda c: other if c == 2 else setup.task  # type: ignore[attr-defined]
    assert "share one task" in not_vectorisable(setup, [1, 2])
    assert not_vectorisable(setup, [1, 3]) is None


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"model.name": "mlp", "model.options": {}}, ("vectorised", "not convolutional")),
        ({"model.name": "cnn", "train.executor": "processes"}, ("processes", "'processes'")),
        ({"train.executor": "sequential"}, ("sequential", "'sequential'")),
        ({"train.executor": "vectorised"}, ("vectorised", "'vectorised'")),
        (
            {"model.name": DROPOUT_MLP, "model.options": {}, "train.executor": "vectorised"},
            ("sequential", "dropout"),
        ),
    ],
)
def test_auto_selection_and_its_reason(overrides, expected):
    name, why = choose_executor(_setup(**overrides))
    assert name == expected[0] and expected[1] in why
