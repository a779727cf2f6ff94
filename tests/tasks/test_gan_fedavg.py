"""The GAN task (FedAvg of whole GANs) through the real round loop, on tiny data."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fedtier.config import from_dict
from fedtier.data import load_dataset
from fedtier.experiment import prepare_arm
from fedtier.local.select import close_executor
from fedtier.local.sgd import client_generator
from fedtier.rounds import run_rounds
from fedtier.tasks import LocalConfig
from fedtier.tasks.gan import GanPair, GanTask, train_central

TINY = {
    "name": "gan-test",
    "seed": 3,
    "data": {"dataset": "digits", "partition": "iid"},
    "topology": {"edges": 2, "clients": 4, "clients_per_edge": 2, "edges_per_round": 2},
    "train": {"executor": "sequential", "task": {"name": "gan", "method": "fedavg"}},
    "gan": {
        "generator": {"name": "dcgan-generator", "options": {"width": 4}},
        "discriminator": {"name": "dcgan-discriminator", "options": {"width": 4}},
        "z_dim": 8,
        "batch_size": 16,
        "lr_g": 1e-2,
        "lr_d": 1e-2,
        "i_lo": 5,
        "i_gl": 2,
    },
    "quant": {"bits": [32], "eval_bits": [32]},
    "eval": {"every": 1},
}


def _setup(**overrides):  # type: ignore[no-untyped-def]
    d = copy.deepcopy(TINY)
    for key, value in overrides.items():
        *sections, field = key.split(".")
        node = d
        for part in sections:
            node = node[part]
        node[field] = value
    cfg = from_dict(d)
    return prepare_arm(cfg, load_dataset("digits"))


def _param_count(pair: GanPair) -> int:
    """Floats in G and D: parameters and float buffers (BatchNorm statistics), by hand."""
    floats = [t for t in pair.state_dict().values() if t.is_floating_point()]
    return sum(t.numel() for t in floats)


def test_fedavg_gan_rounds_train_the_discriminator_and_count_fp32_bytes() -> None:
    setup = _setup()
    pair = setup.model
    assert isinstance(pair, GanPair) and isinstance(setup.task, GanTask)
    before = setup.task.evaluate(copy.deepcopy(pair), setup.test, 500)
    records: list[dict] = []
    w = run_rounds(setup, records.append)
    close_executor(setup)
    assert [r["round"] for r in records] == [1, 2]
    after = records[-1]["bits"]["32"]
    # the discriminators learnt something: its loss fell from the untrained pair's ≈ 2 ln 2
    assert before["d_loss"] == pytest.approx(2 * math.log(2), abs=0.1)
    assert after["d_loss"] < before["d_loss"] - 0.05
    assert after["d_accuracy"] != pytest.approx(before["d_accuracy"], abs=1e-3)
    assert not torch.equal(w, setup.layout.flatten(_setup().model))
    # no codec: each of the 4 devices uploads its G and D as fp32, 2 rounds
    p = _param_count(pair)
    costs = records[-1]["costs"]
    assert costs["bytes_client_edge"] == 2 * 4 * 4 * p
    assert costs["bytes_edge_cloud"] == 2 * 2 * 4 * p


def test_codec_bytes_are_the_quantized_payload() -> None:
    setup = _setup(upload=[{"name": "quantize", "levels": 256}])
    records: list[dict] = []
    run_rounds(setup, records.append)
    close_executor(setup)
    p = _param_count(setup.model)
    # encode_uniform: Q (4 bytes), lo and hi per bucket of 1024 (8 bytes each), 1 byte each
    per_upload = 4 + 8 * math.ceil(p / 1024) + p
    assert records[-1]["costs"]["bytes_client_edge"] == 2 * 4 * per_upload


def test_one_round_is_the_sample_weighted_mean_of_the_devices_gans() -> None:
    setup = _setup(**{"gan.i_gl": 1})
    start = setup.layout.flatten(setup.model)
    w = run_rounds(setup, lambda r: None)
    close_executor(setup)
    # by hand: each device trains its own copy of the initial pair from its own stream,
    # then the mean weighted by the devices' sample counts (κ = 1, all devices sampled)
    trained, sizes = [], []
    task, cfg = setup.task, setup.cfg
    for c in range(4):
        x, _ = setup.client_data(c)
        pair = copy.deepcopy(setup.model)
        setup.layout.load(pair, start)
        local = LocalConfig(1, cfg.train.batch_size, cfg.train.lr)
        task.train_local(pair, x, local, client_generator(cfg.seed, 0, c))
        trained.append(setup.layout.flatten(pair))
        sizes.append(len(x))
    n = torch.tensor(sizes, dtype=torch.float64)
    expected = (torch.stack(trained).double() * (n / n.sum())[:, None]).sum(0)
    assert torch.allclose(w.double(), expected, atol=1e-5)
    assert not torch.allclose(expected, start.double(), atol=1e-3)


def test_central_training_in_pieces_equals_one_run() -> None:
    setup = _setup()
    x = setup.client_data(0)[0]
    whole, pieces = copy.deepcopy(setup.model), copy.deepcopy(setup.model)
    task = setup.task
    train_central(whole, x, 4, 16, task, seed=1)
    opt = train_central(pieces, x, 2, 16, task, seed=1)
    train_central(pieces, x, 2, 16, task, seed=1, start=2, opt=opt)
    for a, b in zip(whole.state_dict().values(), pieces.state_dict().values()):
        assert torch.equal(a, b)
