"""The process-pool executor agrees with the sequential reference."""

import torch

from fedtier.data import load_dataset
from fedtier.experiment import prepare_arm
from fedtier.local.arm import train_sequential
from fedtier.local.parallel import ProcessExecutor
from tests.conftest import tiny_config

DIGITS = load_dataset("digits")


def test_process_deltas_equal_sequential_ones_including_fedbn_state():
    overrides = {"train.batch_size": 8, "model.batchnorm": "local", "train.epochs": 2}
    seq_setup = prepare_arm(tiny_config(**overrides), DIGITS)
    par_setup = prepare_arm(tiny_config(**overrides), DIGITS)
    w = seq_setup.layout.flatten(seq_setup.model)
    clients = [0, 3, 5, 7, 11]
    executor = ProcessExecutor(workers=2)  # BatchNorm model: sequential memory layout
    try:
        for step in (0, 1):  # the second round restores the device-kept BatchNorm state
            seq = train_sequential(seq_setup, w, clients, step)
            par = executor(par_setup, w, clients, step)
            assert seq.abs().max() > 1e-3
            torch.testing.assert_close(par, seq, atol=1e-5, rtol=1e-4)
    finally:
        executor.close()
    for c in clients:
        torch.testing.assert_close(
            par_setup.local_state[c], seq_setup.local_state[c], atol=1e-5, rtol=1e-4
        )


def test_auto_picks_processes_for_a_cnn_only_with_several_cores(monkeypatch):
    from fedtier.local import parallel, select

    setup = prepare_arm(tiny_config(), DIGITS)
    monkeypatch.setattr(parallel, "available_workers", lambda: 2)
    assert select.choose_executor(setup)[0] == "processes"
    monkeypatch.setattr(parallel, "available_workers", lambda: 1)
    assert select.choose_executor(setup)[0] == "sequential"


def test_channels_last_workers_agree_on_a_plain_cnn():
    setup = prepare_arm(tiny_config(**{"model.name": "cnn", "train.batch_size": 8}), DIGITS)
    w = setup.layout.flatten(setup.model)
    executor = ProcessExecutor(workers=2, channels_last=True)
    try:
        par = executor(setup, w, [1, 2, 4], 0)
    finally:
        executor.close()
    seq = train_sequential(setup, w, [1, 2, 4], 0)
    assert seq.abs().max() > 1e-3
    torch.testing.assert_close(par, seq, atol=1e-5, rtol=1e-4)


def test_process_deltas_equal_sequential_ones_for_the_diffusion_task():
    overrides = {
        "model.name": "denoiser-mlp",
        "model.options": {"hidden": 16, "embed": 8},
        "train.task": "diffusion-test",
        "train.batch_size": 8,
    }
    setup = prepare_arm(tiny_config(**overrides), DIGITS)
    w = setup.layout.flatten(setup.model)
    clients = [0, 3, 5]
    seq = train_sequential(setup, w, clients, 2)
    executor = ProcessExecutor(workers=2)
    try:
        par = executor(setup, w, clients, 2)
    finally:
        executor.close()
    assert seq.abs().max() > 1e-3
    torch.testing.assert_close(par, seq, atol=1e-6, rtol=1e-5)
