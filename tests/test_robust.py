import pytest
import torch

from fedtier.aggregate.robust import FACTORIES, build_rule, check_rule_config
from fedtier.errors import ConfigError, FedtierError
from fedtier.experiment import run_experiment

ROBUST = ["median", "trimmed-mean", "krum", "multi-krum", "bulyan", "foolsgold", "cosine"]


def honest_and_byzantine(n: int, f: int, p: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    honest = 1.0 + 0.1 * torch.randn(n - f, p, generator=g)
    byz = 100.0 * torch.ones(f, p)
    return torch.cat([honest, byz])


@pytest.mark.parametrize("name", ROBUST)
def test_permutation_invariant(name):
    u = honest_and_byzantine(11, 2)
    w = torch.ones(11)
    rule = build_rule(name, {"f": 2} if name not in ("foolsgold", "cosine") else {}, "x")
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(rule(u, w)[0], rule(u[perm], w[perm])[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["median", "trimmed-mean", "krum", "multi-krum", "bulyan"])
def test_tolerates_f_byzantine_rows(name):
    u = honest_and_byzantine(11, 2)
    out, _ = build_rule(name, {"f": 2}, "x")(u, torch.ones(11))
    honest = u[:9]
    assert bool(
        (out >= honest.min(0).values - 1e-6).all() and (out <= honest.max(0).values + 1e-6).all()
    )


@pytest.mark.parametrize("name", ["median", "trimmed-mean", "bulyan"])
def test_coordinatewise_output_inside_the_hull_of_all_rows(name):
    u = torch.randn(11, 20, generator=torch.Generator().manual_seed(3))
    out, _ = build_rule(name, {"f": 2}, "x")(u, torch.ones(11))
    assert bool((out >= u.min(0).values - 1e-6).all() and (out <= u.max(0).values + 1e-6).all())


def test_krum_returns_one_row_and_flags_rejections():
    u = honest_and_byzantine(7, 2)
    out, m = build_rule("krum", {"f": 2}, "x")(u, torch.ones(7))
    assert any(torch.equal(out, row) for row in u[:5])
    assert m["kept/5"] == 0.0 and m["kept/6"] == 0.0 and m["rejected"] == 6.0


def test_multi_krum_drops_the_byzantine_rows_and_averages_the_rest():
    u = honest_and_byzantine(9, 2)
    out, m = build_rule("multi-krum", {"f": 2}, "x")(u, torch.ones(9))
    torch.testing.assert_close(out, u[:7].mean(0))
    assert [m[f"kept/{i}"] for i in range(9)] == [1.0] * 7 + [0.0, 0.0]


def test_trimmed_mean_by_hand():
    u = torch.tensor([[1.0], [2.0], [3.0], [100.0], [-50.0]])
    out, _ = build_rule("trimmed-mean", {"f": 1}, "x")(u, torch.ones(5))
    torch.testing.assert_close(out, torch.tensor([2.0]))


def test_median_by_hand_even_and_odd():
    rule = build_rule("median", {"f": 1}, "x")
    torch.testing.assert_close(
        rule(torch.tensor([[1.0], [5.0], [3.0]]), torch.ones(3))[0], torch.tensor([3.0])
    )
    torch.testing.assert_close(
        rule(torch.tensor([[1.0], [5.0], [3.0], [4.0]]), torch.ones(4))[0], torch.tensor([3.5])
    )


@pytest.mark.parametrize(
    "name,f,n,needs",
    [
        ("krum", 2, 6, "n > 2f + 2"),
        ("multi-krum", 1, 4, "n > 2f + 2"),
        ("bulyan", 2, 10, "n >= 4f + 3"),
        ("median", 2, 4, "n > 2f"),
        ("trimmed-mean", 3, 6, "n > 2f"),
    ],
)
def test_preconditions_refuse_clearly(name, f, n, needs):
    rule = build_rule(name, {"f": f}, "aggregate.edge_rule")
    with pytest.raises(ConfigError) as e:
        rule(torch.zeros(n, 3), torch.ones(n))
    msg = str(e.value)
    assert "aggregate.edge_rule" in msg and needs in msg and f"n={n}" in msg and f"f={f}" in msg


def test_config_checks_preconditions_before_training(tiny, tmp_path):
    cfg = tiny(**{"aggregate.edge_rule": {"name": "krum", "f": 1}})
    with pytest.raises(
        ConfigError, match=r"aggregate.edge_rule.*krum needs n > 2f \+ 2.*n=3 with f=1"
    ):
        check_rule_config(cfg)
    with pytest.raises(ConfigError, match="krum needs"):  # run_experiment checks before training
        run_experiment(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"aggregate\.edge_rule\.q.*fields of name 'krum'"):
        tiny(**{"aggregate.edge_rule": {"name": "krum", "q": 1}})
    with pytest.raises(ConfigError, match=r"aggregate\.cloud_rule\.name.*'krum'"):
        tiny(**{"aggregate.cloud_rule": "krumm"})
    with pytest.raises(FedtierError, match=r"aggregate\.edge_rule\.f.*'mean'"):
        tiny(**{"aggregate.edge_rule": {"name": "mean", "f": 1}})  # mean takes no options


def test_foolsgold_downweights_identical_sybils():
    g = torch.Generator().manual_seed(0)
    honest = torch.randn(6, 50, generator=g)
    sybil = torch.ones(1, 50).repeat(3, 1) + 0.001 * torch.randn(3, 50, generator=g)
    out, m = build_rule("foolsgold", {}, "x")(torch.cat([honest, sybil]), torch.ones(9))
    assert all(m[f"kept/{i}"] == 0.0 for i in range(6, 9))
    assert all(m[f"kept/{i}"] == 1.0 for i in range(6))
    torch.testing.assert_close(out, honest.mean(0), atol=1e-4, rtol=1e-4)


def test_cosine_filter_removes_opposed_updates():
    g = torch.Generator().manual_seed(0)
    honest = 1.0 + 0.2 * torch.randn(8, 30, generator=g)
    out, m = build_rule("cosine", {}, "x")(torch.cat([honest, -5 * honest[:1]]), torch.ones(9))
    assert m["kept/8"] == 0.0 and m["rejected"] == 1.0
    torch.testing.assert_close(out, honest.mean(0))


def test_every_factory_is_buildable_with_defaults():
    for name in FACTORIES:
        build_rule(name, {}, "x")
