"""The Ray executor: the sequential executor's numbers, the data set stored once per run, a
killed worker's job rerun with an unchanged result, and clear errors. One local Ray (2 CPUs)
serves the whole module."""

import os
import sys

import pytest
import ray
import torch

from fedtier.cli import main
from fedtier.data import load_dataset
from fedtier.errors import ConfigError, FedtierError
from fedtier.experiment import prepare_arm
from fedtier.local import distributed
from fedtier.local.arm import train_sequential
from fedtier.local.distributed import RayExecutor
from fedtier.local.jobs import JobContext
from fedtier.local.select import close_executor
from fedtier.rounds import run_rounds
from tests.conftest import tiny_config
from tests.local.dying_task import DiesOnce

DIGITS = load_dataset("digits")
FEDBN_CNN = {"train.batch_size": 8, "model.batchnorm": "local", "train.epochs": 2}
CLIENTS = [0, 3, 5, 7, 11]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    distributed.connect(num_cpus=2)
    yield
    distributed.shutdown()


def test_ray_deltas_and_device_states_equal_the_sequential_ones_bitwise():
    """FedBN CNN (NCHW layout): two steps, the second from the device-kept BatchNorm states."""
    seq = prepare_arm(tiny_config(**FEDBN_CNN), DIGITS)
    par = prepare_arm(tiny_config(**FEDBN_CNN), DIGITS)
    w = seq.layout.flatten(seq.model)
    executor = RayExecutor()
    try:
        for step in (0, 1):
            expected = train_sequential(seq, w, CLIENTS, step)
            assert expected.abs().max() > 1e-3
            assert torch.equal(executor(par, w, CLIENTS, step), expected)
    finally:
        executor.close()
    assert sorted(par.local_state) == sorted(seq.local_state) == CLIENTS
    for c in CLIENTS:
        assert torch.equal(par.local_state[c], seq.local_state[c])


def test_a_run_on_ray_gives_the_sequential_runs_numbers(monkeypatch):
    """Three rounds of a plain CNN through the config (train.executor: ray): the same
    evaluations and final state as train.executor: sequential (channels-last convolutions
    on the workers: to 1e-5), and the arm's context is put into the store once, not per
    round."""
    stored = []
    put = ray.put
    monkeypatch.setattr(ray, "put", lambda x, **kw: (stored.append(type(x)), put(x, **kw))[1])
    finals, evals = {}, {}
    for ex in ("sequential", "ray"):
        setup = prepare_arm(tiny_config(**{"model.name": "cnn", "train.executor": ex}), DIGITS)
        assert setup.executor_name == ex
        initial = setup.layout.flatten(setup.model)
        evals[ex] = []
        try:
            finals[ex] = run_rounds(setup, evals[ex].append)
        finally:
            close_executor(setup)
    torch.testing.assert_close(finals["ray"], finals["sequential"], atol=1e-5, rtol=0)
    assert (finals["ray"] - initial).abs().max() > 1e-2
    assert len(evals["ray"]) == len(evals["sequential"]) == 3
    for a, b in zip(evals["ray"], evals["sequential"]):
        assert a["bits"]["32"]["accuracy"] == pytest.approx(b["bits"]["32"]["accuracy"], abs=1e-3)
    # 3 rounds × 2 edges = 6 executor calls: one context, one start state per call
    assert stored.count(JobContext) == 1
    assert len(stored) == 1 + 6


def test_a_killed_worker_is_rerun_and_the_round_is_unchanged(tmp_path):
    """The first loss evaluated anywhere kills its worker process (os._exit, mid-job); Ray
    reruns the job and the round's deltas equal the sequential executor's."""
    marker = tmp_path / "died"
    seq = prepare_arm(tiny_config(**FEDBN_CNN), DIGITS)
    par = prepare_arm(tiny_config(**FEDBN_CNN), DIGITS)
    par.task = DiesOnce(par.task, str(marker))
    w = seq.layout.flatten(seq.model)
    executor = RayExecutor(max_retries=2)
    try:
        got = executor(par, w, CLIENTS, 0)
    finally:
        executor.close()
    assert marker.exists()
    pid = int(marker.read_text())
    assert pid != os.getpid()
    with pytest.raises(ProcessLookupError):  # that worker is gone
        os.kill(pid, 0)
    assert torch.equal(got, train_sequential(seq, w, CLIENTS, 0))


def test_a_job_that_keeps_dying_fails_the_run_once_retries_are_spent(tmp_path):
    marker = tmp_path / "died"
    setup = prepare_arm(tiny_config(**FEDBN_CNN), DIGITS)
    setup.task = DiesOnce(setup.task, str(marker))
    w = setup.layout.flatten(setup.model)
    executor = RayExecutor(max_retries=0)
    try:
        with pytest.raises(ray.exceptions.WorkerCrashedError):
            executor(setup, w, [0], 0)
    finally:
        executor.close()


def test_without_ray_the_cli_names_the_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(FedtierError, match=r"pip install 'fedtier\[ray\]'"):
        RayExecutor()
    argv = ["run", "qafed-mnist", "--set", "train.executor=ray", "--set", "data.dataset=digits"]
    assert main([*argv, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "fedtier[ray]" in err and "Traceback" not in err


def test_ray_settings_are_checked_by_the_config():
    cfg = tiny_config(**{"ray": {"address": "auto"}})
    assert cfg.ray.address == "auto" and cfg.ray.num_cpus is None and cfg.ray.max_retries == 3
    with pytest.raises(ConfigError, match="ray.num_cpus"):
        tiny_config(**{"ray": {"address": "10.0.0.1:6379", "num_cpus": 4}})
    with pytest.raises(ConfigError, match="train.executor"):
        tiny_config(**{"train.executor": "rays"})


def test_an_address_where_nothing_listens_fails_at_once_naming_the_field():
    with pytest.raises(FedtierError, match=r"ray.address '127.0.0.1:1': nothing answers"):
        distributed._check_reachable("127.0.0.1:1", timeout_s=2.0)
    distributed._check_reachable("auto")  # Ray's own discovery: not checked here
