"""Mixed precision (train.precision): bf16 autocast of client training, fp32 everywhere else."""

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fedtier.config import ConfigError
from fedtier.data import load_dataset
from fedtier.experiment import prepare_arm
from fedtier.local import messages, precision
from fedtier.local.arm import local_config, train_sequential
from fedtier.local.sgd import batch_schedule, client_generator
from fedtier.local.vectorised import train_vectorised
from fedtier.tasks import LocalConfig
from tests.conftest import tiny_config

DIGITS = load_dataset("digits")


def _setup(**overrides):
    return prepare_arm(tiny_config(**overrides), DIGITS)


def test_auto_is_bf16_only_with_bf16_units_and_says_why_once(monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert precision.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    monkeypatch.setattr(messages, "_said", set())
    # records reach caplog even after the CLI's show_log() stopped "fedtier" propagating
    monkeypatch.setattr(logging.getLogger("fedtier"), "propagate", True)
    with caplog.at_level(logging.WARNING, logger="fedtier"):
        assert precision.resolve_precision("auto", "cpu") == "fp32"
        assert precision.resolve_precision("auto", "cpu") == "fp32"
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "fp32" in said[0] and "avx512_bf16" in said[0]
    # explicit choices are kept as asked
    assert precision.resolve_precision("bf16", "cpu") == "bf16"
    assert precision.resolve_precision("fp32", "cpu") == "fp32"


def test_cpu_flags_read_from_proc_cpuinfo_when_present():
    flags = precision.cpu_flags()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        assert flags == frozenset()
        return
    line = next(ln for ln in text.splitlines() if ln.startswith("flags"))
    assert flags == frozenset(line.split(":", 1)[1].split())


def test_config_takes_the_three_values_and_refuses_others():
    assert local_config(tiny_config(**{"train.precision": "bf16"})).precision == "bf16"
    assert local_config(tiny_config()).precision == "fp32"
    with pytest.raises(ConfigError, match="train.precision"):
        tiny_config(**{"train.precision": "fp16"})


def _hand_step(model, x, y, lr, bf16):
    """One plain SGD step written out: forward under torch.autocast when bf16."""
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(x)
    F.cross_entropy(out.float(), y).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad


@pytest.mark.parametrize("prec", ["fp32", "bf16"])
def test_a_client_update_equals_a_hand_written_autocast_loop(prec):
    """Through the real client path (sequential executor): the same batches, the same
    arithmetic as plain torch.autocast steps; bf16 differs from fp32."""
    setup = _setup(**{"train.precision": prec, "train.momentum": 0.0, "model.name": "cnn"})
    w = setup.layout.flatten(setup.model)
    client, step = 0, 2
    delta = train_sequential(setup, w, [client], step)[0]
    x, y = setup.client_data(client)
    local = local_config(setup.cfg)
    g = client_generator(setup.cfg.seed, step, client)
    ref = setup.model
    setup.layout.load(ref, w)
    ref.train()
    for idx in batch_schedule(len(y), local, g):
        _hand_step(ref, x[idx], y[idx], local.lr, prec == "bf16")
    expected = setup.layout.flatten(ref) - w
    torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-6)
    if prec == "bf16":
        setup32 = _setup(**{"train.momentum": 0.0, "model.name": "cnn"})
        delta32 = train_sequential(setup32, w, [client], step)[0]
        gap = (delta - delta32).norm() / delta32.norm()
        assert 1e-4 < gap < 0.1  # really ran in bf16, and still the same update to ~1%
        assert delta.dtype == torch.float32  # master weights stay fp32


@pytest.mark.parametrize("prec", ["fp32", "bf16"])
def test_vectorised_executor_runs_the_forward_pass_in_the_asked_precision(prec):
    """bf16 noise between two executors is as large as bf16's own gap from fp32, so the
    check is on what the layers see: autocast on during the vmapped forward pass."""
    over = {"train.precision": prec, "model.name": "mlp", "model.options": {"hidden": 32}}
    setup = _setup(**over)
    seen = []
    first = next(m for m in setup.model.modules() if isinstance(m, torch.nn.Linear))
    first.register_forward_pre_hook(lambda m, a: seen.append(torch.is_autocast_enabled("cpu")))
    w = setup.layout.flatten(setup.model)
    vec = train_vectorised(setup, w, [0, 1, 2], 3)
    assert seen and all(s == (prec == "bf16") for s in seen)
    seq = train_sequential(setup, w, [0, 1, 2], 3)
    assert ((vec - seq).norm() / seq.norm()) < (0.03 if prec == "bf16" else 1e-5)


def test_qat_multibit_loss_under_bf16_keeps_the_ste_gradient():
    """QAFed's multi-bit loss (eq. 8) through the STE: under bf16 autocast the gradient
    points the same way as in fp32 (the quantizers run on fp32 master weights)."""
    setup = _setup(**{"quant.qat": True, "quant.bits": [8, 4], "model.name": "cnn"})
    x, y = setup.client_data(0)
    grads = {}
    for prec in ("fp32", "bf16"):
        setup.model.zero_grad()
        g = torch.Generator().manual_seed(0)
        with precision.autocast(prec, "cpu"):
            loss = setup.task.loss(setup.model, (x[:32], y[:32]), g)
        loss.backward()
        grads[prec] = torch.cat([p.grad.flatten() for p in setup.model.parameters()])
    assert torch.isfinite(grads["bf16"]).all()
    cos = F.cosine_similarity(grads["fp32"], grads["bf16"], dim=0)
    assert cos > 0.98
    assert not torch.equal(grads["fp32"], grads["bf16"])


def test_local_config_carries_precision_to_workers_by_value():
    cfg = LocalConfig(1, 8, 0.1, precision="bf16")
    import pickle

    assert pickle.loads(pickle.dumps(cfg)).precision == "bf16"
