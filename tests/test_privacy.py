import json
import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from scipy import stats

from fedtier.aggregate.robust import build_rule
from fedtier.data import load_dataset
from fedtier.errors import ConfigError
from fedtier.experiment import prepare_arm, run_experiment
from fedtier.privacy import NoiseKey, dp_epsilon, local_dp
from fedtier.schedules import run_schedule
from fedtier.security import privacy_record
from fedtier.seeding import torch_generator
from fedtier.topology import build_topology, plan_round
from fedtier.upload import UploadContext


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", None, seed=0)


def test_central_dp_noise_has_the_calibrated_scale():
    clip, z, n, p = 2.0, 1.5, 10, 200_000
    rule = build_rule("dp-mean", {"clip": clip, "noise": z}, "x")
    out, _, _ = rule(torch.zeros(n, p), torch.ones(n))
    assert out.std().item() == pytest.approx(z * clip / n, rel=0.01)
    assert abs(out.mean().item()) < 3 * z * clip / n / math.sqrt(p)


def test_central_dp_clips_every_row_and_sums_equally():
    rule = build_rule("dp-mean", {"clip": 1.0, "noise": 0.0}, "x")
    u = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    out, m, kept = rule(u, torch.tensor([100.0, 1.0]))
    torch.testing.assert_close(out, (torch.tensor([0.6, 0.8]) + torch.tensor([0.3, 0.4])) / 2)
    assert m["clipped"] == 1.0 and kept is None  # clipped rows still enter the sum


def test_central_dp_noise_is_fresh_for_every_round_edge_and_edge_round():
    z, clip, p = 1.0, 1.0, 50_000
    u, w = torch.zeros(4, p), torch.ones(4)

    def release(r, e, k):
        key = NoiseKey(seed=7, round=r, edge=e, edge_round=k)
        return build_rule("dp-mean", {"clip": clip, "noise": z}, "x", key)(u, w)[0]

    base = release(2, 0, 0)
    # the noise is the seeding helper's stream (seed, "dp-mean", round, edge, edge round)
    ref = z * clip * torch.randn(p, generator=torch_generator(7, "dp-mean", 2, 0, 0)) / 4
    torch.testing.assert_close(base, ref)
    torch.testing.assert_close(release(2, 0, 0), base)  # rebuilt: the same release, same noise
    for other in (release(3, 0, 0), release(2, 1, 0), release(2, 0, 1), release(3, 1, 1)):
        # two releases subtracted do not cancel: independent noise, ‖a − b‖ ≈ √2 ‖a‖
        gap = float((other - base).norm() / base.norm())
        assert gap == pytest.approx(math.sqrt(2), rel=0.02)
        assert abs(float(torch.corrcoef(torch.stack([base, other]))[0, 1])) < 0.02


def test_central_dp_fixed_denominator_and_empty_sample():
    clip, z, p = 1.0, 2.0, 1000
    key = NoiseKey(seed=0, round=1, edge=1, edge_round=0, expected_rows=2.5)
    rule = build_rule("dp-mean", {"clip": clip, "noise": z}, "x", key)
    noise = z * clip * torch.randn(p, generator=torch_generator(0, "dp-mean", 1, 1, 0))
    u = torch.zeros(3, p)
    u[:, 0] = torch.tensor([3.0, 0.5, -0.2])
    out, _, _ = rule(u, torch.tensor([5.0, 1.0, 1.0]))
    expect = noise.clone()
    expect[0] += 1.0 + 0.5 - 0.2  # clipped rows summed, not weighted
    torch.testing.assert_close(out, expect / 2.5)  # divided by q N_e, not by the 3 rows
    empty, _, _ = rule(torch.zeros(0, p), torch.zeros(0))
    torch.testing.assert_close(empty, noise / 2.5)


def test_dp_mean_key_is_not_a_user_option():
    with pytest.raises(ConfigError, match="set by the round loop"):
        build_rule("dp-mean", {"key": 1}, "aggregate.edge_rule")
    with pytest.raises(ConfigError, match="seed"):
        build_rule("dp-mean", {"seed": 0}, "aggregate.edge_rule")


def dp_arm(tiny, digits, **overrides):
    """A DP arm on an MLP whose clients barely move (lr 1e-12): the model moves by noise."""
    settings = {
        "model.name": "mlp",
        "model.options": {"hidden": 32},
        "train.lr": 1e-12,
        "train.momentum": 0.0,
        "aggregate.edge_rule": {"name": "dp-mean", "clip": 1.0, "noise": 1.0},
        "topology.clients_per_edge": 1,  # q = 1/6: some edges sample no one
        "seed": 2,  # round 1 samples no client at all, round 2 none at edge 0
        **overrides,
    }
    return prepare_arm(tiny(**settings), digits)


def train(setup):
    w0 = setup.layout.flatten(setup.model).clone()
    return run_schedule(setup, lambda r: None) - w0


@pytest.mark.parametrize("kappa", [1, 2])
def test_central_dp_noise_through_the_training_loop(tiny, digits, kappa):
    rounds = 4
    setup = dp_arm(tiny, digits, **{"train.rounds": rounds, "aggregate.edge_rounds": kappa})
    moved = train(setup)
    p = moved.numel()
    # reference: every (round, edge, edge round) adds its own N(0, z²C²) from the seeding
    # helper; the cloud's fedavg over edges weighted by q N_e = 1 divides the sum by Σ q N_e
    ref = torch.zeros(p)
    topo, seed = setup.topology, setup.cfg.seed
    plans = [plan_round(topo, setup.cfg.topology, seed, t, poisson=True) for t in range(rounds)]
    for plan in plans:
        for e in plan.edges:
            for k in range(kappa):
                ref += torch.randn(p, generator=torch_generator(seed, "dp-mean", plan.round, e, k))
    ref /= 2.0
    torch.testing.assert_close(moved, ref, atol=1e-5, rtol=0)
    assert any(not cs for plan in plans for cs in plan.edges.values())  # an empty edge too
    # 4 rounds move √4 = 2 × one round's noise, not 4 × (noise reused every round)
    one = train(dp_arm(tiny, digits, **{"train.rounds": 1, "aggregate.edge_rounds": kappa}))
    assert float(moved.norm() / one.norm()) == pytest.approx(2.0, rel=0.1)
    expected_one = math.sqrt(2 * kappa * p) / 2.0  # ‖Σ_e Σ_k n_{e,k}‖ / Σ q N_e
    assert float(one.norm()) == pytest.approx(expected_one, rel=0.05)
    again = train(dp_arm(tiny, digits, **{"train.rounds": rounds, "aggregate.edge_rounds": kappa}))
    assert torch.equal(again, moved)


def test_two_edges_of_one_round_get_different_noise(tiny, digits):
    from dataclasses import replace

    from fedtier.rounds import program_of

    setup = dp_arm(tiny, digits, **{"train.rounds": 1})
    seen = []
    program = program_of(setup)
    original = program.edge

    def spy(*args):  # the edge step is replaceable: record what each edge sends the cloud
        result = original(*args)
        seen.append(result.delta)
        return result

    setup.program = replace(program, edge=spy)
    train(setup)
    assert len(seen) == 2
    ratio = float((seen[0] - seen[1]).norm() / seen[0].norm())
    assert ratio == pytest.approx(math.sqrt(2), rel=0.1)


def test_local_dp_noise_is_fresh_per_edge_round_and_client(tiny, digits):
    setup = dp_arm(
        tiny,
        digits,
        **{
            "aggregate.edge_rule": "mean",
            "upload": [{"name": "ldp", "clip": 1.0, "noise": 1.0}],
            "topology.clients_per_edge": 3,
            "train.rounds": 3,
            "aggregate.edge_rounds": 2,
        },
    )
    calls = []
    chain = setup.upload

    def record(deltas, ctx):
        out, m = chain(deltas, ctx)
        calls.append((ctx.round, list(ctx.clients), out))
        return out, m

    setup.upload = record
    train(setup)
    keys = [(r, c) for r, cs, _ in calls for c in cs]
    assert sorted({r for r, _ in keys}) == list(range(6))  # edge step t·κ + k
    assert len(keys) == len(set(keys))  # no (step, client) twice
    rows = torch.cat([out for _, _, out in calls])
    for (r, c), row in zip(keys, rows):  # deltas ≈ 0: the upload is the client's own noise
        ref = torch.randn(row.numel(), generator=torch_generator(2, "ldp", r, c))
        torch.testing.assert_close(row, ref, atol=1e-5, rtol=0)
    corr = torch.corrcoef(rows).fill_diagonal_(0)
    assert float(corr.abs().max()) < 0.15


def test_local_dp_noise_scale_and_per_client_determinism():
    clip, z, p = 0.5, 2.0, 100_000
    stage = local_dp(clip, z)
    ctx = UploadContext(round=3, edge=0, clients=[7, 9], num_samples=torch.ones(2), seed=0)
    out, _ = stage(torch.zeros(2, p), ctx)
    for row in out:
        assert row.std().item() == pytest.approx(z * clip, rel=0.01)
    # client 9's noise does not depend on who else uploads
    alone, _ = stage(torch.zeros(1, p), UploadContext(3, 0, [9], torch.ones(1), 0))
    torch.testing.assert_close(alone[0], out[1])


def test_epsilon_comes_from_opacus_and_behaves():
    acc = RDPAccountant()
    for _ in range(40):
        acc.step(noise_multiplier=1.1, sample_rate=0.2)
    assert dp_epsilon(1.1, 0.2, 40, 1e-5) == pytest.approx(acc.get_epsilon(1e-5))
    assert dp_epsilon(1.1, 0.2, 40, 1e-5) > dp_epsilon(1.1, 0.2, 20, 1e-5)
    assert dp_epsilon(2.0, 0.2, 40, 1e-5) < dp_epsilon(1.1, 0.2, 40, 1e-5)
    assert dp_epsilon(0.0, 0.2, 1, 1e-5) == math.inf
    assert dp_epsilon(1.0, 0.2, 0, 1e-5) == 0.0


def opacus_epsilon(z, q, rounds, delta):
    acc = RDPAccountant()
    for _ in range(rounds):  # one Poisson-subsampled Gaussian per cloud round
        acc.step(noise_multiplier=z, sample_rate=q)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize(
    ("kind", "kappa", "per_edge", "edges_per_round"),
    [("central", 1, 3, 2), ("central", 3, 4, 2), ("local", 2, 2, 1), ("central", 2, 3, 1)],
)
def test_privacy_record_matches_opacus_stepped_per_cloud_round(
    tiny, digits, kind, kappa, per_edge, edges_per_round
):
    z, rounds = 1.0, 30
    dp = (
        {"aggregate.edge_rule": {"name": "dp-mean", "clip": 1.0, "noise": z, "delta": 1e-5}}
        if kind == "central"
        else {"upload": [{"name": "ldp", "clip": 1.0, "noise": z, "delta": 1e-5}]}
    )
    cfg = tiny(
        **dp,
        **{
            "aggregate.edge_rounds": kappa,
            "topology.clients_per_edge": per_edge,
            "topology.edges_per_round": edges_per_round,
        },
    )
    record = privacy_record(prepare_arm(cfg, digits), rounds)
    q = per_edge / 6  # 12 clients on 2 edges
    # κ Gaussians with multiplier z on one sample = one Gaussian with z / √κ per cloud round
    expect = opacus_epsilon(z / math.sqrt(kappa), q, rounds, 1e-5)
    assert record["epsilon"] == pytest.approx(expect, rel=1e-9)
    assert record["sampling"] == "poisson" and record["q"] == pytest.approx(q)
    assert record["mechanism"] == kind and record["edge_rounds"] == kappa
    assert record["steps"] == rounds
    if kind == "local":  # the edge sees who uploads: no amplification by sampling against it
        assert record["epsilon_vs_edge"] == pytest.approx(
            opacus_epsilon(z / math.sqrt(kappa), 1.0, rounds, 1e-5)
        )
    if (kappa, per_edge) == (3, 4):  # the numbers: z = 1, q = 2/3, 30 rounds, κ = 3
        assert record["epsilon"] == pytest.approx(64.0, abs=0.05)
        # what the first release reported: 90 independently subsampled steps
        assert opacus_epsilon(z, q, 90, 1e-5) == pytest.approx(55.3, abs=0.05)


def test_poisson_sampling_is_poisson(tiny):
    cfg = tiny(**{"topology.clients": 20, "topology.clients_per_edge": 3}).topology
    topo = build_topology(cfg, np.full(20, 10), seed=0)
    rounds, q, n = 3000, 0.3, 10
    taken = np.zeros((rounds, 20), dtype=bool)
    for t in range(rounds):
        for cs in plan_round(topo, cfg, 0, t, poisson=True).edges.values():
            taken[t, cs] = True
    # every client is taken with probability q
    freq = taken.mean(0)
    assert np.all(np.abs(freq - q) < 4 * math.sqrt(q * (1 - q) / rounds))
    # each edge's sample size is Binomial(10, q) (chi-square against the pmf)
    sizes = np.concatenate([taken[:, :10].sum(1), taken[:, 10:].sum(1)])
    observed = np.bincount(sizes, minlength=n + 1)
    expected = stats.binom.pmf(np.arange(n + 1), n, q) * len(sizes)
    big = expected >= 5
    obs = np.append(observed[big], observed[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    assert stats.chisquare(obs, exp).pvalue > 1e-3
    assert (observed[0] > 0) and len(set(sizes.tolist())) > 4  # sizes vary, may be empty
    # clients are independent: every pair is taken together with probability q²
    # (fixed-size sampling of 3 of 10 would give q · 2/9 = 0.067 within an edge)
    both = (taken[:, :, None] & taken[:, None, :]).mean(0)[np.triu_indices(20, 1)]
    assert np.all(np.abs(both - q * q) < 5 * math.sqrt(q * q * (1 - q * q) / rounds))
    # the fixed-size default is unchanged: exactly 3 per edge
    fixed = plan_round(topo, cfg, 0, 5)
    assert [len(cs) for cs in fixed.edges.values()] == [3, 3]


def test_dp_needs_the_synchronous_schedule(tiny):
    for dp in (
        {"aggregate.edge_rule": "dp-mean"},
        {"upload": [{"name": "ldp", "noise": 1.0}]},
    ):
        with pytest.raises(ConfigError, match="schedule.name"):
            tiny(**dp, **{"schedule.name": "fedasync"})
    with pytest.raises(ConfigError, match="aggregate.cloud_rule"):
        tiny(**{"aggregate.cloud_rule": "dp-mean"})


def test_dp_options_are_checked(tiny):
    with pytest.raises(ConfigError, match=r"aggregate\.edge_rule\.clip"):
        tiny(**{"aggregate.edge_rule": {"name": "dp-mean", "clip": -1}})
    with pytest.raises(ConfigError, match=r"upload\[0\]\.noise"):
        tiny(upload=[{"name": "ldp", "noise": -1}])
    with pytest.raises(ConfigError, match=r"aggregate\.edge_rule\.seed"):
        tiny(**{"aggregate.edge_rule": {"name": "dp-mean", "seed": 0}})


@pytest.mark.parametrize(("kind", "kappa"), [("central", 1), ("central", 2), ("local", 3)])
def test_epsilon_of_a_run_matches_opacus_called_directly(tiny, tmp_path, kind, kappa):
    """ε logged by a DP run (run_experiment → metrics.jsonl and summary.json) equals Opacus'
    RDP accountant stepped once per cloud round with (q, z/√κ), and grows with the rounds."""
    z, delta, rounds, per_edge = 1.3, 1e-5, 4, 2
    dp = (
        {"aggregate.edge_rule": {"name": "dp-mean", "clip": 1.0, "noise": z, "delta": delta}}
        if kind == "central"
        else {"upload": [{"name": "ldp", "clip": 1.0, "noise": z, "delta": delta}]}
    )
    cfg = tiny(
        **dp,
        **{
            "model.name": "mlp",
            "model.options": {"hidden": 16},
            "quant.eval_bits": [32],
            "train.rounds": rounds,
            "aggregate.edge_rounds": kappa,
            "topology.clients_per_edge": per_edge,
        },
    )
    run_experiment(cfg, tmp_path / "run")
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    evals = [r for r in map(json.loads, lines) if "bits" in r]
    assert [r["round"] for r in evals] == list(range(1, rounds + 1))
    q = per_edge / 6  # 12 clients on 2 edges
    eps = [r["privacy"]["epsilon"] for r in evals]
    for t, e in enumerate(eps, 1):
        acc = RDPAccountant()
        for _ in range(t):
            acc.step(noise_multiplier=z / math.sqrt(kappa), sample_rate=q)
        assert e == pytest.approx(acc.get_epsilon(delta), rel=1e-9)
    assert all(a < b for a, b in zip(eps, eps[1:]))  # more rounds, more privacy spent
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["arms"]["main"]["privacy"]["epsilon"] == eps[-1]
