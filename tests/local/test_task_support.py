"""Executors ask the task what it supports: device-kept parameter groups, a task's own local
update, which executor applies."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from fedtier.data import load_dataset
from fedtier.experiment import prepare_arm
from fedtier.local.arm import client_start, train_sequential
from fedtier.local.select import choose_executor
from fedtier.local.vectorised import not_vectorisable, train_vectorised
from fedtier.metrics import MetricSpec
from fedtier.quant import QuantSpec
from fedtier.rounds import run_rounds
from fedtier.state import StateLayout
from fedtier.tasks import AutoencoderTask, ClassificationTask, DiffusionTask, Groups, qat
from tests.conftest import TwoPart, tiny_config

DIGITS = load_dataset("digits")
MLP = {"model.name": "mlp", "model.options": {"hidden": 16}, "train.batch_size": 8}


def _two_group_setup(**overrides):
    base = prepare_arm(tiny_config(**{**MLP, **overrides}), DIGITS)
    torch.manual_seed(1)
    model = TwoPart()
    groups = Groups((("body", "body"), ("head", "head")), kept=frozenset({"head"}))
    task = ClassificationTask(10, groups=groups)
    return dataclasses.replace(
        base,
        model=model,
        task=task,
        layout=StateLayout.of(model, groups.uploads),
        local_state={},
    )


def _head(setup, flat):
    views = setup.layout.views(flat)
    return torch.cat([views["head.weight"].flatten(), views["head.bias"]])


def test_a_device_kept_group_is_never_uploaded_and_each_device_keeps_its_own():
    seq, vec = _two_group_setup(), _two_group_setup()
    w = seq.layout.flatten(seq.model)
    clients = [0, 3, 5]
    for step in (0, 1):
        d_seq = train_sequential(seq, w, clients, step)
        d_vec = train_vectorised(vec, w, clients, step)
        torch.testing.assert_close(d_vec, d_seq, atol=1e-5, rtol=1e-4)
        for row in d_seq:
            assert torch.count_nonzero(_head(seq, row)) == 0  # nothing of the head uploaded
            assert _head(seq, row).numel() == 170
        heads = [_head(seq, seq.local_state[c]) for c in clients]
        for c, head in zip(clients, heads):
            assert not torch.allclose(head, _head(seq, w))  # trained on the device
            torch.testing.assert_close(_head(seq, client_start(seq, w, c)), head)  # kept
            torch.testing.assert_close(_head(vec, vec.local_state[c]), head, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(heads[0], heads[1])  # each device its own


def test_the_global_model_never_receives_a_kept_group():
    setup = _two_group_setup(**{"train.rounds": 2})
    w0 = setup.layout.flatten(setup.model)
    w = run_rounds(setup, lambda record: None)
    torch.testing.assert_close(_head(setup, w), _head(setup, w0), rtol=0, atol=0)
    body = ~setup.upload_mask
    assert not torch.equal(w[~body], w0[~body])  # the shared body did train


@dataclasses.dataclass(frozen=True)
class OneBigStep:
    """A task with its own local update: one full-batch gradient step of size 0.5."""

    inner: ClassificationTask = ClassificationTask(10)
    labelled: bool = True
    groups: Groups = Groups()
    headline: str = "accuracy"
    tables: tuple[str, ...] = ("accuracy",)
    masked = None
    plain_cross_entropy: bool = False

    @property
    def metrics(self) -> dict[str, MetricSpec]:
        return dict(self.inner.metrics)

    def loss(self, model, batch, generator):
        return self.inner.loss(model, batch, generator)

    def evaluate(self, model, data, batch_size):
        return self.inner.evaluate(model, data, batch_size)

    @property
    def local_update(self):
        def update(model, data, cfg, generator):
            x, y = data
            grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
            with torch.no_grad():
                for p, g in zip(model.parameters(), grads):
                    p.sub_(0.5 * g)
            return 1

        return update


def test_a_tasks_own_local_update_is_what_the_clients_run():
    setup = prepare_arm(tiny_config(**MLP), DIGITS)
    setup = dataclasses.replace(setup, task=OneBigStep(), local_state={})
    assert "own local update" in not_vectorisable(setup)
    assert choose_executor(setup)[0] == "sequential"
    w = setup.layout.flatten(setup.model)
    delta = train_sequential(setup, w, [4], 0)[0]
    setup.layout.load(setup.model, w)
    x, y = setup.client_data(4)
    grads = torch.autograd.grad(F.cross_entropy(setup.model(x), y), list(setup.model.parameters()))
    torch.testing.assert_close(delta, torch.cat([-0.5 * g.flatten() for g in grads]))


@pytest.mark.parametrize(
    "task",
    [AutoencoderTask(), DiffusionTask(), qat(ClassificationTask(10), [8], QuantSpec())],
    ids=["autoencoder", "diffusion", "qat"],
)
def test_the_dense_executor_declines_tasks_that_are_not_plain_cross_entropy(task):
    small = {"topology.clients": 200, "topology.clients_per_edge": 5}  # sample space pays
    cfg = {**MLP, **small, "model.options": {"hidden": 32}, "train.epochs": 2}
    cfg.update({"train.momentum": 0.0, "train.executor": "dense"})
    setup = prepare_arm(tiny_config(**cfg), DIGITS)
    assert choose_executor(setup)[0] == "dense"  # the model and settings qualify
    name, why = choose_executor(dataclasses.replace(setup, task=task))
    assert name == "vectorised" and "not plain cross-entropy" in why


def test_prepare_arm_composes_the_tasks_groups_with_fedbn(monkeypatch):
    from fedtier import experiment

    groups = Groups((("encoder", "encoder"), ("decoder", "decoder")), kept=frozenset({"decoder"}))
    monkeypatch.setattr(experiment, "make_task", lambda *a: AutoencoderTask(groups=groups))
    cfg = {"model.name": "autoencoder", "model.options": {"hidden": 8, "latent": 4}}
    setup = prepare_arm(tiny_config(**cfg, **{"model.batchnorm": "local"}), DIGITS)
    uploaded = dict(zip(setup.layout.names, setup.layout.uploaded))
    assert uploaded and all(u == n.startswith("encoder.") for n, u in uploaded.items())
    w = setup.layout.flatten(setup.model)
    delta = train_sequential(setup, w, [1], 0)[0]
    decoder = ~setup.upload_mask
    assert torch.count_nonzero(delta[decoder]) == 0 and torch.count_nonzero(delta[~decoder]) > 0


@pytest.mark.parametrize("wanted", ["auto", "vectorised", "dense", "processes"])
def test_a_local_adam_rules_out_only_the_vectorised_executors(wanted):
    cfg = {**MLP, "train.optimizer": "adam", "train.momentum": 0.0, "train.executor": wanted}
    setup = prepare_arm(tiny_config(**cfg), DIGITS)
    name, why = choose_executor(setup)
    if wanted == "processes":
        assert name == "processes"  # its workers run the sequential executor's loop
    else:  # an MLP with SGD would be vectorised or dense
        assert name == "sequential" and "'adam', not SGD" in why
