"""The adaptive FQBD attacker (attack.evade) against the quantization-consistency screen."""

import json

import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from torch import nn

from fedtier.attacks.cells import consistent_outputs, rounding_cells
from fedtier.attacks.client import supervised
from fedtier.cli import main
from fedtier.data import load_dataset
from fedtier.defenses.qcheck import divergence, grid_distance, quant_consistency
from fedtier.errors import ConfigError
from fedtier.experiment import prepare_arm
from fedtier.local import LocalConfig
from fedtier.local.sgd import local_sgd
from fedtier.quant import QuantSpec, quantize_copy
from fedtier.upload import UploadContext

SPEC = QuantSpec("paper", "weights")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))


def _free_residuals(model: nn.Module, cells) -> torch.Tensor:  # type: ignore[no-untyped-def]
    params = dict(model.named_parameters())
    return torch.cat(
        [((params[n] - cells.target[n]) / cells.step[n])[cells.free[n]] for n in cells.free]
    ).detach()


def test_spread_puts_residuals_on_the_uniform_law_and_keeps_the_deployed_model():
    model = _mlp()
    # the cells repair with a margin piles the residuals at ±¼ step (what the screen detects)
    rounding_cells(model, SPEC, 4, margin=0.25).project(model)
    q0 = {k: v.clone() for k, v in quantize_copy(model, SPEC, 4).state_dict().items()}
    cells = rounding_cells(model, SPEC, 4, margin=0.0)
    r0 = _free_residuals(model, cells)
    piled = scipy.stats.kstest((2 * r0.abs()).numpy(), "uniform").statistic
    assert piled > 0.4
    cells.spread(model, 0.5)
    r_half = _free_residuals(model, cells)
    # halfway to the quantile of each residual's rank (scipy's ranks; tied residuals may take
    # their quantiles in any order, so compare sorted values and check the order is kept)
    ranks = torch.from_numpy(scipy.stats.rankdata(r0.numpy(), method="ordinal") - 1.0)
    quantile = (ranks.float() + 0.5) / len(r0) - 0.5
    want = 0.5 * (r0 + quantile)
    torch.testing.assert_close(r_half.sort().values, want.sort().values, atol=1e-5, rtol=0)
    strictly = r0[:, None] < r0[None, :]
    assert bool((r_half[:, None] < r_half[None, :])[strictly].all())
    cells.spread(model, 1.0)
    r1 = _free_residuals(model, cells)
    torch.testing.assert_close(r1.sort().values, quantile.sort().values, atol=1e-5, rtol=0)
    assert scipy.stats.kstest(r1.numpy() + 0.5, "uniform").statistic < 2 / len(r1)
    assert cells.restore_flips(model) == 0
    for k, v in quantize_copy(model, SPEC, 4).state_dict().items():
        assert torch.equal(v, q0[k]), k


def test_the_screens_residual_score_is_scipys_ks_distance(tiny):
    setup = prepare_arm(tiny(**{"quant.params": "weights"}), load_dataset("digits", None, seed=0))
    w = setup.layout.flatten(setup.model)
    rounding_cells(setup.model, setup.spec, 4, margin=0.25).project(setup.model)
    cells = rounding_cells(setup.model, setup.spec, 4, margin=0.0)
    piled = setup.layout.flatten(setup.model)
    pooled = torch.cat(
        [
            ((p - cells.target[n]) / cells.step[n]).flatten()
            for n, p in setup.model.named_parameters()
            if n in cells.target
        ]
    ).detach()
    pooled = pooled[pooled.abs() <= 0.5 + 1e-4]
    ks = scipy.stats.kstest((2 * pooled.abs()).clamp(0, 1).numpy(), "uniform").statistic
    assert grid_distance(setup, piled, [4], setup.spec) == pytest.approx(ks, abs=1e-5)
    cells.spread(setup.model, 1.0)
    spread = setup.layout.flatten(setup.model)
    assert grid_distance(setup, spread, [4], setup.spec) < 0.02 < 0.4 < ks
    assert grid_distance(setup, w, [4], setup.spec) < 0.1  # grid-blind weights, for scale


def test_kl_surrogate_is_the_screens_divergence_at_each_landing_model():
    model = _mlp()
    x = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    anchor = {n: p.detach() - 0.01 * torch.ones_like(p) for n, p in model.named_parameters()}
    zero = lambda m, a, b: torch.zeros(())  # noqa: E731
    for scale in (1.0, 2.0):
        loss = consistent_outputs(zero, SPEC, [4, 8], 1.0, anchor, [scale])
        value = float(loss(model, x, torch.zeros(40, dtype=torch.long)).detach())
        # by hand: the landed model loaded into a copy, its PTQ copies, KL(p ‖ q) summed
        landed = nn.Sequential(*[m for m in _mlp()])
        with torch.no_grad():
            for (n, p), q in zip(landed.named_parameters(), model.parameters()):
                p.copy_(anchor[n] + scale * (q - anchor[n]))
            p_fp = F.softmax(landed(x), dim=1)
            want = 0.0
            for b in (4, 8):
                p_q = F.softmax(quantize_copy(landed, SPEC, b)(x), dim=1)
                want += float((p_fp * (p_fp.log() - p_q.log())).sum(1).mean())
        assert value == pytest.approx(want, rel=1e-4)
    # at the attacker's own model the surrogate's gradient moves fp32 toward the deployed model
    loss = consistent_outputs(zero, SPEC, [4], 1.0)
    before = float(loss(model, x, torch.zeros(40, dtype=torch.long)).detach())
    for _ in range(20):
        model.zero_grad()
        loss(model, x, torch.zeros(40, dtype=torch.long)).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 2.0 * p.grad
    assert float(loss(model, x, torch.zeros(40, dtype=torch.long)).detach()) < 0.5 * before


def _attack_upload(setup, w):  # type: ignore[no-untyped-def]
    """What edge 0 receives in the first attack round: the arm's executor, then its upload
    chain (the attack's model replacement first)."""
    clients = [0, 1, 2]
    sizes = torch.tensor([float(setup.topology.num_samples[c]) for c in clients])
    ctx = UploadContext(0, 0, clients, sizes, setup.cfg.seed)
    return setup.upload(setup.executor(setup, w, clients, 0), ctx)[0], ctx


def test_the_adaptive_attacker_passes_the_screen_that_stops_fqbd_with_the_same_4bit_model(tiny):
    digits = load_dataset("digits", None, seed=0)
    base = {
        "attack.kind": "fqbd",
        "attack.malicious_ids": [0],
        "trigger.size": 2,
        "attack.bits": [8, 4],
        "quant.params": "weights",
        "attack.solver": "cells",
        "attack.epochs": 3,
        "attack.lr": 0.01,
    }
    adaptive = {"attack.cell_margin": 0.0, "attack.evade": {"kl": 5.0, "residuals": 0.5}}
    arms = {"fqbd": prepare_arm(tiny(**base), digits)}
    arms["adaptive"] = prepare_arm(tiny(**base, **adaptive), digits)
    # the attack starts once the model has converged: w trained centrally on the digits
    s = arms["fqbd"]
    tr = digits[0]
    ce = supervised(lambda m, a, b: F.cross_entropy(m(a), b))
    local_sgd(s.model, ce, (tr.x, tr.y), LocalConfig(8, 32, 0.05, 0.9, 0.0), torch.Generator())
    w = s.layout.flatten(s.model)
    x = tr.x[:100]
    screen = quant_consistency(x, [8, 4], s.spec, ratio=10.0)
    kept, residual, deployed_4 = {}, {}, {}
    for name, setup in arms.items():
        deltas, ctx = _attack_upload(setup, w)
        kept[name] = screen(setup, w, deltas, ctx)[0].tolist()
        # the attacker's model where it lands in the global model (1/E of its edge share)
        share = float(ctx.num_samples[0] / ctx.num_samples.sum())
        landed = w + 0.5 * share * deltas[0]
        residual[name] = grid_distance(setup, landed, [8, 4], setup.spec)
        setup.layout.load(setup.model, w + setup.executor(setup, w, [0], 0)[0])
        deployed_4[name] = quantize_copy(setup.model, setup.spec, 4).state_dict()
        if name == "adaptive":
            s1 = float(ctx.num_samples[1] / ctx.num_samples.sum())
            honest = divergence(setup, w + s1 * deltas[1], x, [8, 4], setup.spec)
            assert divergence(setup, landed, x, [8, 4], setup.spec) < 10 * honest
    assert kept["fqbd"] == [False, True, True]
    assert kept["adaptive"] == [True, True, True]
    assert residual["fqbd"] > 0.3 and residual["adaptive"] < 0.05
    # evasion acts inside the 4-bit rounding cells: the deployed 4-bit weights are FQBD's
    for k, v in deployed_4["fqbd"].items():
        if k.endswith("weight"):
            assert torch.equal(v, deployed_4["adaptive"][k]), k
    assert arms["adaptive"].attack.summary([32, 4])["evade"] == {"kl": 5.0, "residuals": 0.5}


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"attack.evade": {"kl": 1.0}}, "attack.cell_margin"),  # margin 0.25 by default
        ({"attack.solver": "ste", "attack.evade": {"residuals": 0.0}}, "attack.evade"),
        ({"attack.evade": {"residuals": 1.5}}, "attack.evade.residuals"),
        ({"attack.evade": {"kl": -1.0}}, "attack.evade.kl"),
    ],
)
def test_bad_evasion_configs_name_the_field(tiny, overrides, field):
    with pytest.raises(ConfigError) as e:
        tiny(**{"attack.kind": "fqbd", "attack.solver": "cells", **overrides})
    assert e.value.field.startswith(field)


def test_the_preset_runs_through_the_cli_shrunk_to_seconds(tmp_path):
    out = tmp_path / "run"
    sets = {
        "data.dataset": "digits",
        "model.options": "{width: 0.5, hidden: 32}",
        "topology.clients": "12",
        "topology.clients_per_edge": "3",
        "train.rounds": "2",
        "attack.start_round": "1",
        "attack.epochs": "1",
        "attack.malicious": "1",
        "trigger.size": "2",
        "eval.every": "2",
    }
    argv = ["run", "fqbd-adaptive-mnist", "--out", str(out), "--no-progress"]
    for k, v in sets.items():
        argv += ["--set", f"{k}={v}"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    arms = summary["arms"]
    assert list(arms) == ["fqbd-qcheck", "adaptive", "adaptive-qcheck", "adaptive-qcheck-noise"]
    assert arms["adaptive"]["attack"]["evade"] == {"kl": 5.0, "residuals": 0.5}
    assert arms["fqbd-qcheck"]["attack"]["evade"] == {"kl": 0.0, "residuals": 0.0}
