import inspect
import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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
    out, _, _ = build_rule(name, {"f": 2}, "x")(u, torch.ones(11))
    honest = u[:9]
    assert bool(
        (out >= honest.min(0).values - 1e-6).all() and (out <= honest.max(0).values + 1e-6).all()
    )


@pytest.mark.parametrize("name", ["median", "trimmed-mean", "bulyan"])
def test_coordinatewise_output_inside_the_hull_of_all_rows(name):
    u = torch.randn(11, 20, generator=torch.Generator().manual_seed(3))
    out, _, _ = build_rule(name, {"f": 2}, "x")(u, torch.ones(11))
    assert bool((out >= u.min(0).values - 1e-6).all() and (out <= u.max(0).values + 1e-6).all())


def test_krum_returns_one_row_and_flags_rejections():
    u = honest_and_byzantine(7, 2)
    out, m, kept = build_rule("krum", {"f": 2}, "x")(u, torch.ones(7))
    assert any(torch.equal(out, row) for row in u[:5])
    assert not kept[5] and not kept[6] and m["rejected"] == 6.0 and int(kept.sum()) == 1


def test_multi_krum_drops_the_byzantine_rows_and_averages_the_rest():
    u = honest_and_byzantine(9, 2)
    out, _, kept = build_rule("multi-krum", {"f": 2}, "x")(u, torch.ones(9))
    torch.testing.assert_close(out, u[:7].mean(0))
    assert kept.tolist() == [True] * 7 + [False, False]


def test_trimmed_mean_by_hand():
    u = torch.tensor([[1.0], [2.0], [3.0], [100.0], [-50.0]])
    out, _, _ = build_rule("trimmed-mean", {"f": 1}, "x")(u, torch.ones(5))
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
    out, _, kept = build_rule("foolsgold", {}, "x")(torch.cat([honest, sybil]), torch.ones(9))
    assert kept.tolist() == [True] * 6 + [False] * 3
    torch.testing.assert_close(out, honest.mean(0), atol=1e-4, rtol=1e-4)


def test_cosine_filter_removes_opposed_updates():
    g = torch.Generator().manual_seed(0)
    honest = 1.0 + 0.2 * torch.randn(8, 30, generator=g)
    out, m, kept = build_rule("cosine", {}, "x")(
        torch.cat([honest, -5 * honest[:1]]), torch.ones(9)
    )
    assert kept.tolist() == [True] * 8 + [False] and m["rejected"] == 1.0
    torch.testing.assert_close(out, honest.mean(0))


def test_every_factory_is_buildable_with_defaults():
    for name in FACTORIES:
        build_rule(name, {}, "x")


# ---------------------------------------------------------------------------------------------
# Brute-force references, written as loops over Python floats straight from the papers, and
# compared with the real rules through build_rule (the path the round loop takes) on many small
# random inputs with unequal weights. Integer-valued updates make distances and medians exact,
# so ties happen often and must be broken as documented (lower row index; smaller value).
# ---------------------------------------------------------------------------------------------

Rows = list[list[float]]


def ref_sqdist(a: list[float], b: list[float]) -> float:
    return sum((x - y) ** 2 for x, y in zip(a, b))


def ref_krum_scores(rows: Rows, neighbours: int) -> list[float]:
    """Blanchard et al. 2017: score(i) = Σ of the squared distances to the `neighbours`
    closest other rows."""
    scores = []
    for i, r in enumerate(rows):
        d = sorted(ref_sqdist(r, s) for j, s in enumerate(rows) if j != i)
        scores.append(sum(d[:neighbours]))
    return scores


def ref_weighted_mean(rows: Rows, weights: list[float]) -> list[float]:
    total = sum(weights)
    return [sum(w * r[k] for w, r in zip(weights, rows)) / total for k in range(len(rows[0]))]


def ref_multi_krum(rows: Rows, weights: list[float], f: int, m: int, neighbours=None):
    """Multi-Krum: the m lowest scores (ties: lower index), their weighted mean."""
    n = len(rows)
    scores = ref_krum_scores(rows, n - f - 2 if neighbours is None else neighbours)
    chosen = sorted(range(n), key=lambda i: (scores[i], i))[:m]
    return ref_weighted_mean([rows[i] for i in chosen], [weights[i] for i in chosen]), chosen


def ref_median_1d(values: list[float]) -> float:
    s, n = sorted(values), len(values)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def ref_median(rows: Rows) -> list[float]:
    return [ref_median_1d([r[k] for r in rows]) for k in range(len(rows[0]))]


def ref_trimmed_mean(rows: Rows, f: int) -> list[float]:
    out = []
    for k in range(len(rows[0])):
        s = sorted(r[k] for r in rows)
        kept = s[f : len(s) - f]
        out.append(sum(kept) / len(kept))
    return out


def ref_bulyan(rows: Rows, f: int):
    """El Mhamdi et al. 2018: θ = n − 2f rows by repeated Krum (on the rows left, with
    k − f − 2 neighbours, at least 1), then per coordinate the mean of the β = θ − 2f values
    closest to the coordinate median (ties: smaller value first)."""
    n = len(rows)
    remaining, selected = list(range(n)), []
    while len(selected) < n - 2 * f:
        k = len(remaining)
        scores = ref_krum_scores([rows[i] for i in remaining], max(k - f - 2, 1))
        best = min(range(k), key=lambda i: (scores[i], i))
        selected.append(remaining.pop(best))
    beta = len(selected) - 2 * f
    out = []
    for k in range(len(rows[0])):
        vals = sorted(rows[i][k] for i in selected)
        med = ref_median_1d(vals)
        closest = sorted(range(len(vals)), key=lambda i: (abs(vals[i] - med), i))[:beta]
        out.append(sum(vals[i] for i in closest) / beta)
    return out, selected


def ref_norm_bound(rows: Rows, weights: list[float], max_norm: float) -> list[float]:
    clipped = []
    for r in rows:
        norm = math.sqrt(sum(x * x for x in r))
        scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
        clipped.append([scale * x for x in r])
    return ref_weighted_mean(clipped, weights)


def ref_cos(a: list[float], b: list[float]) -> float:
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
    return sum(x * y for x, y in zip(a, b)) / (max(na, 1e-12) * max(nb, 1e-12))


def ref_foolsgold(rows: Rows, weights: list[float], kappa: float):
    """Fung et al. 2020, Algorithm 1 as the authors' code computes it (cosine − I, so the
    maxima include 0): pardoning, α = 1 − max, rescale to max 1, logit + 0.5, clip."""
    n = len(rows)
    cs = [[ref_cos(rows[i], rows[j]) if i != j else 0.0 for j in range(n)] for i in range(n)]
    v = [max(cs[i]) for i in range(n)]
    pard = [row[:] for row in cs]
    for i in range(n):
        for j in range(n):
            if i != j and v[i] < v[j]:
                pard[i][j] = cs[i][j] * v[i] / v[j]
    alpha = [min(1.0, max(0.0, 1 - max(pard[i]))) for i in range(n)]
    top = max(alpha)
    alpha = [a / top for a in alpha] if top > 0 else alpha
    lr = []
    for a in alpha:
        if a >= 1 - 1e-6:
            lr.append(1.0)
        elif a <= 1e-6:
            lr.append(0.0)
        else:
            lr.append(min(1.0, max(0.0, kappa * (math.log(a / (1 - a)) + 0.5))))
    w = [wi * li for wi, li in zip(weights, lr)]
    if sum(w) <= 0:
        w = weights
    return ref_weighted_mean(rows, w), lr


def ref_cosine_filter(rows: Rows, weights: list[float], xi: float, xi_step: float):
    """AFA-style filter: drop rows whose cosine to the weighted mean of the kept rows is below
    median − ξ·std of the kept rows' cosines (std with n − 1), raise ξ, repeat."""
    n = len(rows)
    kept = list(range(n))
    x = xi
    while len(kept) > 2:
        mean = ref_weighted_mean([rows[i] for i in kept], [weights[i] for i in kept])
        sim = [ref_cos(r, mean) for r in rows]
        s = sorted(sim[i] for i in kept)
        med = s[(len(s) - 1) // 2]  # torch.median: the lower middle value
        avg = sum(s) / len(s)
        std = math.sqrt(sum((y - avg) ** 2 for y in s) / (len(s) - 1))
        bad = [i for i in kept if sim[i] < med - x * std]
        if not bad:
            break
        kept = [i for i in kept if i not in bad]
        x += xi_step
    return ref_weighted_mean([rows[i] for i in kept], [weights[i] for i in kept]), kept


def as_lists(u: torch.Tensor) -> Rows:
    return [[float(x) for x in row] for row in u]


def assert_matches(out: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(
        out.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-5
    )


def kept_rows(kept: torch.Tensor | None, metrics: dict, n: int) -> list[int]:
    """The rows of a rule's [n] bool mask, checked against its ``rejected`` count."""
    assert kept is not None and kept.dtype == torch.bool and kept.shape == (n,)
    assert metrics["rejected"] == n - int(kept.sum())
    return [i for i in range(n) if kept[i]]


@st.composite
def problems(draw, min_rows: Callable[[int], int], max_f: int = 2, max_p: int = 3):
    """(f, integer-valued updates [n, p] with many ties, unequal positive weights [n])."""
    f = draw(st.integers(0, max_f))
    n = draw(st.integers(min_rows(f), min_rows(f) + 4))
    p = draw(st.integers(1, max_p))
    values = draw(st.lists(st.integers(-4, 4), min_size=n * p, max_size=n * p))
    weights = draw(st.lists(st.floats(0.1, 10.0), min_size=n, max_size=n))
    return f, torch.tensor(values, dtype=torch.float32).reshape(n, p), torch.tensor(weights)


SETTINGS = settings(max_examples=150, deadline=None, derandomize=True)


@SETTINGS
@given(problems(lambda f: 2 * f + 3))
def test_krum_matches_brute_force(problem):
    f, u, w = problem
    out, m, kept = build_rule("krum", {"f": f}, "x")(u, w)
    expected, chosen = ref_multi_krum(as_lists(u), w.tolist(), f, 1)
    assert_matches(out, expected)
    assert kept_rows(kept, m, len(u)) == chosen and m["rejected"] == len(u) - 1


@SETTINGS
@given(problems(lambda f: 2 * f + 3), st.integers(1, 7))
def test_multi_krum_with_m_matches_brute_force(problem, m):
    f, u, w = problem
    m = min(m, len(u))
    out, metrics, kept = build_rule("multi-krum", {"f": f, "m": m}, "x")(u, w)
    expected, chosen = ref_multi_krum(as_lists(u), w.tolist(), f, m)
    assert_matches(out, expected)
    assert kept_rows(kept, metrics, len(u)) == sorted(chosen)


@SETTINGS
@given(problems(lambda f: 2 * f + 3))
def test_multi_krum_default_m_is_n_minus_f(problem):
    f, u, w = problem
    out, metrics, kept = build_rule("multi-krum", {"f": f}, "x")(u, w)
    expected, chosen = ref_multi_krum(as_lists(u), w.tolist(), f, len(u) - f)
    assert_matches(out, expected)
    assert kept_rows(kept, metrics, len(u)) == sorted(chosen)


@SETTINGS
@given(problems(lambda f: 4 * f + 3, max_f=2))
def test_bulyan_matches_brute_force(problem):
    f, u, w = problem
    out, m, kept = build_rule("bulyan", {"f": f}, "x")(u, w)
    expected, selected = ref_bulyan(as_lists(u), f)
    assert_matches(out, expected)
    assert kept_rows(kept, m, len(u)) == sorted(selected) and m["rejected"] == 2 * f


@SETTINGS
@given(problems(lambda f: 2 * f + 1))
def test_median_matches_brute_force(problem):
    f, u, w = problem
    out, _, kept = build_rule("median", {"f": f}, "x")(u, w)
    assert_matches(out, ref_median(as_lists(u)))
    assert kept is None  # every row enters the median


@SETTINGS
@given(problems(lambda f: 2 * f + 1))
def test_trimmed_mean_matches_brute_force(problem):
    f, u, w = problem
    out, _, kept = build_rule("trimmed-mean", {"f": f}, "x")(u, w)
    assert_matches(out, ref_trimmed_mean(as_lists(u), f))
    assert kept is None


@SETTINGS
@given(problems(lambda f: 1, max_f=0), st.sampled_from([0.5, 1.0, 3.0]))
def test_norm_bound_matches_brute_force(problem, max_norm):
    _, u, w = problem
    out, m, kept = build_rule("norm-bound", {"max_norm": max_norm}, "x")(u, w)
    assert kept is None  # clipped rows still count
    assert_matches(out, ref_norm_bound(as_lists(u), w.tolist(), max_norm))
    assert m["clipped"] == sum(math.sqrt(sum(x * x for x in r)) > max_norm for r in as_lists(u))


def float_problems(seed: int, n: int, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(p, generator=g)
    # a mix of near-parallel rows (sybil-like), opposed rows and random rows
    kinds = torch.randint(0, 3, (n,), generator=g)
    rows = torch.randn(n, p, generator=g)
    rows[kinds == 0] = direction + 0.05 * rows[kinds == 0]
    rows[kinds == 1] = -direction + 0.5 * rows[kinds == 1]
    return rows, 0.1 + 5 * torch.rand(n, generator=g)


@pytest.mark.parametrize("seed", range(60))
@pytest.mark.parametrize("kappa", [0.5, 1.0])
def test_foolsgold_matches_brute_force(seed, kappa):
    u, w = float_problems(seed, 3 + seed % 6, 5)
    out, m, kept = build_rule("foolsgold", {"kappa": kappa}, "x")(u, w)
    expected, lr = ref_foolsgold(as_lists(u), w.tolist(), kappa)
    assert_matches(out, expected)
    assert kept_rows(kept, m, len(u)) == [i for i, r in enumerate(lr) if r > 0]


def test_foolsgold_does_not_pardon_a_row_opposed_to_all_others():
    # a and b agree, c opposes both: the authors' code keeps c at full rate (its maximum
    # similarity is 0); pardoning its −1 similarities into +1 would zero it instead
    a = torch.tensor([1.0, 0.0, 0.0])
    u = torch.stack([a, a + torch.tensor([0.0, 0.1, 0.0]), -a - torch.tensor([0, 0, 0.1])])
    _, _, kept = build_rule("foolsgold", {}, "x")(u, torch.ones(3))
    assert kept[2]


@pytest.mark.parametrize("seed", range(60))
def test_cosine_filter_matches_brute_force(seed):
    u, w = float_problems(seed, 3 + seed % 8, 4)
    out, m, mask = build_rule("cosine", {"xi": 1.0, "xi_step": 0.5}, "x")(u, w)
    expected, kept = ref_cosine_filter(as_lists(u), w.tolist(), 1.0, 0.5)
    assert_matches(out, expected)
    assert kept_rows(mask, m, len(u)) == kept


# Hand-made inputs that separate the rules from their likely look-alikes. Each test first checks
# with the references that the input does separate them, then that the rule gives the right one.

KRUM_LINE = torch.tensor([[0.0], [8.0], [14.0], [19.0], [22.0], [24.0], [28.0]])  # n = 7


def test_krum_neighbour_count_is_n_minus_f_minus_2():
    rows, w = as_lists(KRUM_LINE), [1.0] * 7
    picks = {k: ref_multi_krum(rows, w, 1, 1, neighbours=k)[1] for k in (2, 3, 4, 5)}
    assert picks[4] != picks[3] and picks[4] != picks[5]  # f = 1: n − f − 2 = 4
    out, m, kept = build_rule("krum", {"f": 1}, "x")(KRUM_LINE, torch.ones(7))
    assert kept_rows(kept, m, 7) == picks[4]
    assert_matches(out, ref_multi_krum(rows, w, 1, 1)[0])


def test_multi_krum_m_and_weights_matter():
    w = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    rows = as_lists(KRUM_LINE)
    for m in range(1, 8):
        out, metrics, kept = build_rule("multi-krum", {"f": 1, "m": m}, "x")(KRUM_LINE, w)
        expected, chosen = ref_multi_krum(rows, w.tolist(), 1, m)
        assert_matches(out, expected)
        assert kept_rows(kept, metrics, 7) == sorted(chosen) and len(chosen) == m
    out, _, _ = build_rule("multi-krum", {"f": 1, "m": 3}, "x")(KRUM_LINE, w)
    uniform, _ = ref_multi_krum(rows, [1.0] * 7, 1, 3)
    assert abs(float(out) - uniform[0]) > 0.1  # the weights are used, not a plain mean


def test_krum_ties_go_to_the_lower_row():
    u = torch.tensor([[5.0], [0.0], [0.0], [1.0], [1.0], [9.0], [9.0]])
    # rows 1, 2 and 3, 4 tie pairwise; f = 1 uses 4 neighbours
    scores = ref_krum_scores(as_lists(u), 4)
    assert scores[1] == scores[2]
    _, m, kept = build_rule("krum", {"f": 1}, "x")(u, torch.ones(7))
    best = min(range(7), key=lambda i: (scores[i], i))
    assert kept_rows(kept, m, 7) == [best]


BULYAN_ROWS = torch.tensor(
    [[0.0, 0.0], [1.0, 5.0], [2.0, 0.0], [2.5, 1.0], [3.0, 2.0], [10.0, -7.0], [11.0, 9.0]]
)  # n = 7, f = 1


def test_bulyan_is_not_a_median_nor_a_trimmed_mean():
    rows = as_lists(BULYAN_ROWS)
    expected, _ = ref_bulyan(rows, 1)
    assert expected != ref_median(rows) and expected != ref_trimmed_mean(rows, 1)
    assert expected != ref_trimmed_mean(rows, 2)
    out, m, kept = build_rule("bulyan", {"f": 1}, "x")(BULYAN_ROWS, torch.rand(7) + 0.5)
    assert_matches(out, expected)
    assert m["rejected"] == 2.0 and kept_rows(kept, m, 7) == sorted(ref_bulyan(rows, 1)[1])


def test_bulyan_median_of_an_even_selection_is_the_middle_mean():
    # n = 8, f = 1: θ = 6 rows selected, β = 4 closest to the median (the mean of the two
    # middle values); the lower middle value as the median would pick another 4
    u = torch.tensor([[0.0], [2.0], [3.0], [5.0], [6.0], [6.5], [40.0], [41.0]])
    expected, selected = ref_bulyan(as_lists(u), 1)
    vals = sorted(float(u[i]) for i in selected)
    lower = vals[2]
    by_lower = sorted(vals, key=lambda v: (abs(v - lower), v))[:4]
    assert sum(by_lower) / 4 != expected[0]
    out, _, _ = build_rule("bulyan", {"f": 1}, "x")(u, torch.ones(8))
    assert_matches(out, expected)


@pytest.mark.parametrize(
    "name,rows_ok,rows_refused",
    [
        ("krum", lambda f: 2 * f + 3, lambda f: 2 * f + 2),
        ("multi-krum", lambda f: 2 * f + 3, lambda f: 2 * f + 2),
        ("bulyan", lambda f: 4 * f + 3, lambda f: 4 * f + 2),
        ("median", lambda f: 2 * f + 1, lambda f: 2 * f),
        ("trimmed-mean", lambda f: 2 * f + 1, lambda f: 2 * f),
    ],
)
@pytest.mark.parametrize("f", [0, 1, 2, 3])
def test_preconditions_at_the_boundary(name, rows_ok, rows_refused, f):
    rule = build_rule(name, {"f": f}, "aggregate.cloud_rule")
    n = rows_ok(f)
    u = torch.arange(float(n * 2)).reshape(n, 2)
    out, _, _ = rule(u, torch.ones(n))
    assert out.shape == (2,)
    n = rows_refused(f)
    if n == 0:
        return
    with pytest.raises(ConfigError, match=rf"aggregate.cloud_rule.*n={n} with f={f}"):
        rule(torch.zeros(n, 2), torch.ones(n))


def test_multi_krum_refuses_m_above_n():
    rule = build_rule("multi-krum", {"f": 1, "m": 6}, "aggregate.edge_rule")
    rule(torch.randn(6, 2), torch.ones(6))
    with pytest.raises(ConfigError, match="m = 6 <= n"):
        rule(torch.randn(5, 2), torch.ones(5))


@pytest.mark.parametrize("name", ["median", "trimmed-mean", "bulyan"])
def test_coordinatewise_rules_ignore_weights(name):
    u = torch.randn(11, 5, generator=torch.Generator().manual_seed(4))
    rule = build_rule(name, {"f": 2}, "x")
    a, _, _ = rule(u, torch.ones(11))
    b, _, _ = rule(u, torch.arange(1.0, 12.0))
    assert torch.equal(a, b)


# Found by mutation testing (mutmut over aggregate/): what the brute-force comparisons above do
# not pin down — the messages that tell the user what to change, option checks, defaults, and
# norm bounding of rows shorter than 1.


@pytest.mark.parametrize(
    "name", ["median", "trimmed-mean", "krum", "multi-krum", "bulyan", "foolsgold", "cosine"]
)
def test_a_refused_precondition_names_the_rule_and_the_fix(name):
    rule = build_rule(name, {}, "aggregate.edge_rule")
    with pytest.raises(
        ConfigError,
        match=rf"^config field 'aggregate.edge_rule': got '{name}'; allowed: {name} needs "
        r".* updates per aggregation, got n=1 with f=\d; sample more clients per edge or lower f$",
    ):
        rule(torch.zeros(1, 2), torch.ones(1))


@pytest.mark.parametrize("f", [-1, 1.5, True, None])
@pytest.mark.parametrize("name", ["median", "trimmed-mean", "krum", "multi-krum", "bulyan"])
def test_f_must_be_a_non_negative_integer(name, f):
    with pytest.raises(ValueError, match=rf"^f must be a non-negative integer, got {f!r}$"):
        FACTORIES[name](f)
    with pytest.raises(ConfigError, match="aggregate.edge_rule"):
        build_rule(name, {"f": f}, "aggregate.edge_rule")


@pytest.mark.parametrize("m", [0, -1, 1.0, True])
def test_krum_m_must_be_a_positive_integer(m):
    with pytest.raises(ValueError, match=rf"^m must be a positive integer, got {m!r}$"):
        FACTORIES["krum"](1, m)


def test_factory_defaults_equal_the_config_defaults():
    """A rule built by name with no options (``edge_rule: median``) behaves as the config
    documents it: the factories' defaults are the config's."""
    from fedtier.config import RuleConfig, variant_names

    checked = 0
    for name, cls in variant_names(RuleConfig).items():
        if name not in FACTORIES:
            continue
        params = inspect.signature(FACTORIES[name]).parameters
        for field, info in cls.model_fields.items():
            if field in params:
                assert params[field].default == info.default, (name, field)
                checked += 1
    assert checked >= 10


@pytest.mark.parametrize("seed", range(10))
def test_norm_bound_on_short_float_rows_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    u, w = 0.3 * torch.randn(5, 3, generator=g), 0.1 + torch.rand(5, generator=g)
    out, m, _ = build_rule("norm-bound", {"max_norm": 0.2}, "x")(u, w)
    assert_matches(out, ref_norm_bound(as_lists(u), w.tolist(), 0.2))
    assert m["clipped"] == sum(math.sqrt(sum(x * x for x in r)) > 0.2 for r in as_lists(u))


# Found by mutation testing over aggregate/, privacy/, upload/ and quant/: FoolsGold's and the
# cosine filter's edge cases (no positive similarity, pure sybils, small κ, equal cosines), the
# exact condition each precondition message states, and the factories' Python defaults.

PAIRWISE_OPPOSED = torch.tensor([[1.0, 0.0], [-0.7, 0.714142842], [-0.7, -0.714142842]])


def test_foolsgold_keeps_every_row_when_no_two_rows_point_the_same_way():
    # cosines −0.7, −0.7 and −0.02: every row's v is 0 (nothing to pardon, no 0/0), every
    # α = 1 − max(0, max_j cs_ij) = 1, so the rule is the weighted mean of all rows
    u, w = PAIRWISE_OPPOSED, torch.tensor([1.0, 2.0, 4.0])
    expected, lr = ref_foolsgold(as_lists(u), w.tolist(), 1.0)
    assert lr == [1.0, 1.0, 1.0]
    out, m, kept = build_rule("foolsgold", {}, "x")(u, w)
    assert_matches(out, expected)
    assert kept_rows(kept, m, 3) == [0, 1, 2]


def test_foolsgold_of_pure_sybils_falls_back_to_the_weights():
    # every row points the same way: every α is 0, every rate 0, so the weights alone decide
    # (documented) and every row counts as rejected
    u = torch.tensor([[1.0, 0.0], [2.0, 0.0], [4.0, 0.0]])  # cosines exactly 1
    w = torch.tensor([1.0, 1.0, 2.0])
    expected, lr = ref_foolsgold(as_lists(u), w.tolist(), 1.0)
    assert lr == [0.0, 0.0, 0.0]
    out, m, kept = build_rule("foolsgold", {}, "x")(u, w)
    assert_matches(out, expected)
    assert m["rejected"] == 3.0 and not kept.any()


@pytest.mark.parametrize("seed", range(12))
def test_foolsgold_with_a_small_kappa_gives_the_top_row_full_rate(seed):
    # with κ = 0.05 the logit of the rescaled top α (1 − 1e-6) would give only 0.72; the
    # authors' code gives α = 1 the rate 1
    u, w = float_problems(seed, 3 + seed % 5, 4)
    out, m, kept = build_rule("foolsgold", {"kappa": 0.05}, "x")(u, w)
    expected, lr = ref_foolsgold(as_lists(u), w.tolist(), 0.05)
    assert 1.0 in lr
    assert_matches(out, expected)
    assert kept_rows(kept, m, len(u)) == [i for i, r in enumerate(lr) if r > 0]


def test_foolsgold_runs_on_two_rows_and_cosine_on_three():
    u = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    out, _, _ = build_rule("foolsgold", {}, "x")(u[:2], torch.ones(2))
    assert_matches(out, [0.5, 0.5, 0.0])
    out, _, _ = build_rule("cosine", {}, "x")(u, torch.ones(3))
    assert_matches(out, [1 / 3] * 3)


def test_cosine_filter_keeps_rows_that_all_point_the_same_way():
    # equal cosines: std = 0, the threshold is the median itself and nobody is below it
    u = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [0.5, 0.5]])
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    out, m, kept = build_rule("cosine", {}, "x")(u, w)
    assert kept_rows(kept, m, 4) == [0, 1, 2, 3]
    assert_matches(out, ref_weighted_mean(as_lists(u), w.tolist()))


@pytest.mark.parametrize(
    "name, options, rows, condition, f",
    [
        ("median", {"f": 2}, 4, "n > 2f", 2),
        ("trimmed-mean", {"f": 1}, 2, "n > 2f", 1),
        ("krum", {"f": 1}, 4, "n > 2f + 2", 1),
        ("multi-krum", {"f": 1}, 4, "n > 2f + 2", 1),
        ("multi-krum", {"f": 0, "m": 3}, 2, "n > 2f + 2", 0),
        ("bulyan", {"f": 1}, 6, "n >= 4f + 3", 1),
        ("foolsgold", {}, 1, "n >= 2", 0),
        ("cosine", {}, 2, "n >= 3", 0),
    ],
)
def test_a_refused_precondition_states_the_rules_condition(name, options, rows, condition, f):
    rule = build_rule(name, options, "aggregate.cloud_rule")
    with pytest.raises(ConfigError) as e:
        rule(torch.ones(rows, 2), torch.ones(rows))
    assert e.value.field == "aggregate.cloud_rule" and e.value.value == name
    assert e.value.allowed == (
        f"{name} needs {condition} updates per aggregation, got n={rows} with f={f}; "
        "sample more clients per edge or lower f"
    )


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_factory_defaults_behave_as_the_config_defaults(name, seed):
    """``FACTORIES[name]()`` (Python, no options) aggregates exactly as the rule the config
    builds from ``edge_rule: <name>`` (every option at the config's default)."""
    from fedtier.config import from_dict
    from fedtier.privacy import NoiseKey

    spec = from_dict({"aggregate": {"edge_rule": name}}).aggregate.edge_rule
    key = NoiseKey(seed=seed, round=1)
    extra = {"key": key} if name == "dp-mean" else {}
    u, w = float_problems(seed, 12, 5)
    u = u * torch.linspace(0.2, 3.0, 12)[:, None]  # norms on both sides of 1
    ours = FACTORIES[name](**extra)(u, w)
    theirs = build_rule(name, spec.options(), "x", key=key)(u, w)
    assert torch.equal(ours[0], theirs[0]) and ours[1] == theirs[1]
    assert (ours[2] is None and theirs[2] is None) or torch.equal(ours[2], theirs[2])


def test_factory_minimum_rows_with_the_default_f_of_one():
    # f = 1 by default: median and trimmed mean need n > 2, Krum n > 4, Bulyan n >= 7
    for name, n in (("median", 3), ("trimmed-mean", 3), ("krum", 5), ("bulyan", 7)):
        u = torch.arange(float(n * 2)).reshape(n, 2)
        out, _, _ = FACTORIES[name]()(u, torch.ones(n))
        assert out.shape == (2,)
        with pytest.raises(FedtierError, match=f"got n={n - 1} with f=1"):
            FACTORIES[name]()(u[: n - 1], torch.ones(n - 1))


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("norm-bound", {"max_norm": 0.0}, "max_norm must be positive, got 0.0"),
        ("dp-mean", {"clip": 0.0}, "clip must be a positive number, got 0.0"),
        ("dp-mean", {"noise": -1.0}, "noise must be a number >= 0 (z = σ / C), got -1.0"),
    ],
)
def test_bad_rule_option_says_which_and_what_is_allowed(name, options, message):
    with pytest.raises(ValueError) as e:
        FACTORIES[name](**options)
    assert str(e.value) == message
    with pytest.raises(ConfigError, match="aggregate.edge_rule"):
        build_rule(name, options, "aggregate.edge_rule")


def test_bad_rule_option_expected_rows_must_be_positive():
    from fedtier.privacy import NoiseKey

    with pytest.raises(ValueError, match=r"^expected_rows must be positive, got 0.0$"):
        FACTORIES["dp-mean"](key=NoiseKey(expected_rows=0.0))
    FACTORIES["norm-bound"](max_norm=1e-9)
    FACTORIES["dp-mean"](noise=0.0)
