"""Client jobs as plain data, and the process-pool executor (fork and spawn) agreeing with
the sequential reference bit for bit."""

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from fedtier.data import load_dataset
from fedtier.data.partition import apply_domain
from fedtier.errors import ConfigError, FedtierError
from fedtier.experiment import prepare_arm, split_clients
from fedtier.local.arm import client_job, job_context, train_sequential
from fedtier.local.jobs import run_job
from fedtier.local.parallel import ProcessExecutor
from fedtier.seeding import torch_generator
from tests.conftest import tiny_config

DIGITS = load_dataset("digits")
MLP = {"model.name": "mlp", "model.options": {"hidden": 16}, "train.executor": "sequential"}
FEDBN_CNN = {"train.batch_size": 8, "model.batchnorm": "local", "train.epochs": 2}


def test_run_job_is_plain_sgd_on_the_clients_samples():
    """One job against SGD written out by hand: the client's samples taken from the
    partition's indices, one randperm per epoch from the (seed, 'local', step, client)
    stream, torch.optim.SGD on the cross-entropy."""
    cfg = tiny_config(**MLP, **{"train.batch_size": 7, "train.epochs": 2})
    setup = prepare_arm(cfg, DIGITS)
    w = setup.layout.flatten(setup.model)
    client, step = 4, 3
    result = run_job(job_context(setup), client_job(setup, w, client, step))

    idx = torch.from_numpy(split_clients(cfg, DIGITS[0])[0][client])
    x, y = DIGITS[0].x[idx], DIGITS[0].y[idx]
    model = copy.deepcopy(setup.model)
    setup.layout.load(model, w)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum)
    g = torch_generator(cfg.seed, "local", step, client)
    steps = 0
    for _ in range(cfg.train.epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), cfg.train.batch_size):
            b = perm[i : i + cfg.train.batch_size]
            opt.zero_grad()
            F.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
            steps += 1

    assert result.client == client and result.weight == len(x)
    assert result.metrics == {"steps": steps} and steps == 2 * math.ceil(len(x) / 7)
    assert torch.equal(result.state, setup.layout.flatten(model))
    assert not torch.equal(result.state, w)


def test_jobs_and_the_context_pickle_without_closures():
    """What crosses to a spawned worker pickles with the plain pickler, and a job run from
    the unpickled copies gives the same state."""
    setup = prepare_arm(tiny_config(**FEDBN_CNN), DIGITS)
    w = setup.layout.flatten(setup.model)
    job = client_job(setup, w, 5, 1)
    context, job2 = pickle.loads(pickle.dumps((job_context(setup), job)))
    assert torch.equal(run_job(context, job2).state, run_job(job_context(setup), job).state)


def test_client_data_gives_each_client_its_partition_and_region_view():
    cfg = tiny_config(**{"data.partition": "label"})
    setup = prepare_arm(cfg, DIGITS)
    parts, edge_of_client = split_clients(cfg, DIGITS[0])
    assert edge_of_client is not None and len(set(edge_of_client.tolist())) == 2
    for c in range(cfg.topology.clients):
        idx = torch.from_numpy(parts[c])
        x, y = setup.client_data(c)
        assert torch.equal(x, apply_domain(DIGITS[0].x, int(edge_of_client[c]))[idx])
        assert torch.equal(y, DIGITS[0].y[idx])


def _agree(overrides, start_method, by_id=True):
    """The executor's deltas and FedBN states equal the sequential executor's exactly, over
    two rounds (the second restores the device-kept state)."""
    seq_setup = prepare_arm(tiny_config(**overrides), DIGITS)
    par_setup = prepare_arm(tiny_config(**overrides), DIGITS)
    if not by_id:  # a closure: the workers cannot be given it under spawn
        data = par_setup.client_data
        par_setup.client_data = lambda c: data(c)
    w = seq_setup.layout.flatten(seq_setup.model)
    clients = [0, 3, 5, 7, 11]
    executor = ProcessExecutor(workers=2, start_method=start_method)
    try:
        for step in (0, 1):
            seq = train_sequential(seq_setup, w, clients, step)
            par = executor(par_setup, w, clients, step)
            assert seq.abs().max() > 1e-3
            assert torch.equal(par, seq)
        carried = [j.data is not None for j in executor.jobs(par_setup, w, clients, 2)]
        assert carried == [not by_id] * len(clients)
    finally:
        executor.close()
    assert sorted(par_setup.local_state) == sorted(seq_setup.local_state)
    for c in seq_setup.local_state:
        assert torch.equal(par_setup.local_state[c], seq_setup.local_state[c])
    return seq_setup


@pytest.mark.parametrize("overrides", [FEDBN_CNN, MLP], ids=["cnn-bn-fedbn", "mlp"])
def test_fork_workers_give_the_sequential_deltas_bitwise(overrides):
    setup = _agree(overrides, "fork")
    assert bool(setup.local_state) == (overrides is FEDBN_CNN)


def test_spawn_workers_give_the_sequential_deltas_bitwise_cnn():
    """Spawned workers receive the arm's ClientData once and look clients up by id."""
    _agree(FEDBN_CNN, "spawn")


def test_spawn_workers_give_the_sequential_deltas_bitwise_mlp_with_shipped_samples():
    """With client data the workers cannot be given (a closure), each job carries its
    client's samples."""
    _agree(MLP, "spawn", by_id=False)


def test_data_replaced_after_start_travels_with_the_jobs():
    setup = prepare_arm(tiny_config(**MLP), DIGITS)
    w = setup.layout.flatten(setup.model)
    executor = ProcessExecutor(workers=2, start_method="fork")
    try:
        first = executor(setup, w, [1, 2], 0)
        assert all(j.data is None for j in executor.jobs(setup, w, [1, 2], 0))
        original = setup.client_data
        setup.client_data = lambda c: original((c + 1) % 12)  # the next client's samples
        assert all(j.data is not None for j in executor.jobs(setup, w, [1, 2], 0))
        shifted = executor(setup, w, [0, 1], 0)
    finally:
        executor.close()
    seq = train_sequential(setup, w, [0, 1], 0)
    assert torch.equal(shifted, seq)
    assert not torch.equal(shifted, first)


def test_spawn_refuses_an_unpicklable_model_with_one_error():
    setup = prepare_arm(tiny_config(**MLP), DIGITS)
    setup.model.scale = lambda x: x  # a closure on the model: spawn cannot send it
    w = setup.layout.flatten(setup.model)
    executor = ProcessExecutor(workers=1, start_method="spawn")
    with pytest.raises(FedtierError, match="train.start_method 'spawn'"):
        executor(setup, w, [0], 0)
    executor.close()


def test_start_method_is_checked_by_the_config():
    assert tiny_config().train.start_method == "fork"
    with pytest.raises(ConfigError, match="start_method"):
        tiny_config(**{"train.start_method": "forkserver"})


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


def test_workers_train_with_a_local_adam_as_the_sequential_executor_does():
    """train.optimizer = adam rules out the vectorised executors only: the workers run it
    (their pool starts) and give the sequential deltas bit for bit."""
    overrides = {**MLP, "train.optimizer": "adam", "train.momentum": 0.0}
    seq_setup = prepare_arm(tiny_config(**overrides), DIGITS)
    par_setup = prepare_arm(tiny_config(**overrides), DIGITS)
    w = seq_setup.layout.flatten(seq_setup.model)
    executor = ProcessExecutor(workers=2, start_method="fork")
    try:
        seq = train_sequential(seq_setup, w, [0, 3, 5], 0)
        par = executor(par_setup, w, [0, 3, 5], 0)
        assert executor._pool is not None  # trained in the workers, not by a fallback
        assert seq.abs().max() > 1e-3 and torch.equal(par, seq)
    finally:
        executor.close()


def test_a_groupnorm_unet_trains_in_the_sequential_layout_and_equals_it_bit_for_bit():
    """GroupNorm is slower in channels-last on CPU, so the workers keep NCHW for the U-Net:
    their deltas are then the sequential reference's exactly (and evaluations run in the
    workers too); a GroupNorm-free CNN still gets channels-last."""
    from fedtier.local.jobs import default_channels_last

    overrides = {
        "model.name": "unet",
        "model.options": {"channels": [8, 16], "layers_per_block": 1},
        "train.task": "diffusion-test",
        "train.batch_size": 8,
        "train.optimizer": "adam",
        "train.momentum": 0.0,
        "train.lr": 1e-3,
    }
    setup = prepare_arm(tiny_config(**overrides), DIGITS)
    assert not default_channels_last(setup.model)
    assert default_channels_last(prepare_arm(tiny_config(**{"model.name": "cnn"}), DIGITS).model)
    assert not default_channels_last(prepare_arm(tiny_config(), DIGITS).model)  # BatchNorm
    w = setup.layout.flatten(setup.model)
    clients = [1, 4]
    executor = ProcessExecutor(workers=2)
    try:
        assert not executor.uses_channels_last(setup)
        par = executor(setup, w, clients, 1)
    finally:
        executor.close()
    seq = train_sequential(setup, w, clients, 1)
    assert seq.abs().max() > 1e-4
    assert torch.equal(par, seq)


def _square(x):
    return x * x


def test_a_pool_whose_terminate_hangs_is_given_up_with_its_workers_killed(monkeypatch):
    """CPython's Pool.terminate() can wait forever after Ctrl-C (its task handler stuck on
    the queue's lock): terminate_pool gives up after its timeout and kills the workers."""
    import multiprocessing as mp
    import multiprocessing.pool
    import threading
    import time

    from fedtier.local.parallel import terminate_pool

    pool = mp.get_context("fork").Pool(2)
    assert pool.map(_square, [1, 2, 3]) == [1, 4, 9]
    workers = list(pool._pool)
    assert all(w.is_alive() for w in workers)
    stuck = threading.Event()

    def hangs():  # what terminate() does first (no more new workers), then it waits forever
        pool._worker_handler._state = mp.pool.TERMINATE
        pool._change_notifier.put(None)
        pool._worker_handler.join()
        stuck.wait()

    monkeypatch.setattr(pool, "terminate", hangs)
    t0 = time.monotonic()
    assert terminate_pool(pool, timeout_s=0.5) is False
    assert time.monotonic() - t0 < 30
    assert all(w.exitcode is not None for w in workers)  # killed and reaped
    stuck.set()
    monkeypatch.undo()
    pool.terminate()


def test_a_pool_that_ends_in_time_is_terminated_and_joined():
    import multiprocessing as mp

    from fedtier.local.parallel import terminate_pool

    pool = mp.get_context("fork").Pool(2)
    workers = list(pool._pool)
    assert terminate_pool(pool, timeout_s=30) is True
    assert all(w.exitcode is not None for w in workers)
