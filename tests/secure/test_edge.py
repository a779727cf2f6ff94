"""Secure aggregation at an edge: the secure mean against an independent fixed-point
reference (Python integers) and the float weighted mean; dropouts; aborts; config checks."""

import numpy as np
import pytest
import torch

from fedtier.aggregate import weighted_mean
from fedtier.config import SecAggConfig, from_dict
from fedtier.errors import ConfigError
from fedtier.secure.edge import add_secure, secure_mean, threshold_count
from fedtier.secure.secagg import max_scale


def case(n=6, p=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    deltas = torch.randn(n, p, generator=g) * 0.05
    weights = torch.tensor([float(w) for w in range(3, 3 + n)])
    mask = torch.ones(p, dtype=torch.bool)
    mask[-5:] = False  # FedBN-like entries kept on the device
    deltas[:, ~mask] = 0.0
    return deltas, weights, mask


def reference(deltas, weights, mask, rows, spec, n):
    """Client-side weighting, fixed point and the edge's division, written out in Python
    integers: Σ round(f_i Δ_ij · s) / Σ round(f_i c s) · c."""
    c = spec.clip_range
    s = max_scale(c, n, spec.bits)
    f = [float(weights[i]) / float(weights.max()) for i in range(n)]
    idx = mask.nonzero().flatten().tolist()
    den = sum(round(f[i] * c * s) for i in rows) / s / c
    return [sum(round(f[i] * float(deltas[i, j]) * s) for i in rows) / s / den for j in idx]


def test_secure_mean_is_the_fixed_point_weighted_mean_of_the_survivors():
    spec = SecAggConfig(name="secagg", clip_range=1.0)
    deltas, weights, mask = case()
    arrived = torch.tensor([True, True, False, True, True, True])
    out = secure_mean(deltas, weights, arrived, mask, spec, (0, 0, 0, 0), list(range(6)))
    rows = [0, 1, 3, 4, 5]
    expect = reference(deltas, weights, mask, rows, spec, 6)
    assert out.mean[mask].double().numpy() == pytest.approx(np.array(expect), abs=1e-7)
    assert (out.mean[~mask] == 0).all()
    plain, _, _ = weighted_mean(deltas[rows][:, mask], weights[rows])
    assert float((out.mean[mask] - plain).abs().max()) < 1e-6  # fixed point ≈ float mean
    m = out.metrics
    assert m["aborted"] == 0 and m["dropped"] == 1 and m["threshold"] == 5
    assert 0 < m["fixed_point_err"] < 1e-6
    assert m["masked_input_up_bytes"] == 4 * (int(mask.sum()) + 1)
    assert m["overhead_up_bytes"] > 0


def test_dropout_is_keyed_per_client_and_aborts_below_t():
    deltas, weights, mask = case(n=10, seed=1)
    arrived = torch.ones(10, dtype=torch.bool)
    spec = SecAggConfig(name="secagg", threshold=0.67, dropout=0.5)
    clients = list(range(100, 110))
    seen = {"aborted": 0, "ok": 0}
    for t in range(8):
        out = secure_mean(deltas, weights, arrived, mask, spec, (3, t, 1, 0), clients)
        again = secure_mean(deltas, weights, arrived, mask, spec, (3, t, 1, 0), clients)
        assert out.metrics["dropped"] == again.metrics["dropped"]  # seeded, reproducible
        if out.mean is None:
            assert out.metrics["aborted"] == 1 and 10 - out.metrics["dropped"] < 7
            assert "fewer than the threshold t = 7" in out.outcome.aborted
            seen["aborted"] += 1
        else:
            assert out.metrics["dropped"] <= 3
            seen["ok"] += 1
    assert seen["aborted"] and seen["ok"]


def test_one_client_is_never_aggregated_securely():
    deltas, weights, mask = case(n=1)
    out = secure_mean(
        deltas, weights, torch.ones(1, dtype=torch.bool), mask,
        SecAggConfig(name="secagg"), (0, 0, 0, 0), [7],
    )  # fmt: skip
    assert out.mean is None and out.metrics["aborted"] == 1


def test_threshold_and_scale_errors_name_the_field():
    assert threshold_count(SecAggConfig(name="secagg", threshold=0.5), 10) == 5
    assert threshold_count(SecAggConfig(name="secagg", threshold=0.1), 10) == 2  # at least 2
    with pytest.raises(ConfigError, match=r"aggregate\.secure\.threshold.*at most 5"):
        threshold_count(SecAggConfig(name="secagg", threshold=6), 5)
    deltas, weights, mask = case()
    spec = SecAggConfig(name="secagg", clip_range=1.0, scale=2.0**30)
    with pytest.raises(ConfigError, match=r"aggregate\.secure\.scale"):
        secure_mean(deltas, weights, torch.ones(6, dtype=torch.bool), mask, spec, (0,) * 4, [1] * 6)


def base(**agg):
    return {
        "data": {"dataset": "digits"},
        "aggregate": {"secure": "secagg", **agg},
    }


@pytest.mark.parametrize("rule", ["krum", "median", "trimmed-mean", "bulyan", "foolsgold",
                                  "cosine", "norm-bound", "dp-mean", "multi-krum"])  # fmt: skip
def test_rules_that_read_each_update_are_refused_with_secure_aggregation(rule):
    with pytest.raises(ConfigError) as e:
        from_dict(base(edge_rule=rule))
    msg = str(e.value)
    assert "aggregate.edge_rule" in msg and rule in msg and "aggregate.secure: secagg" in msg
    assert "only learns their sum" in msg


def test_screens_and_async_schedules_are_refused_with_secure_aggregation():
    with pytest.raises(ConfigError, match=r"defenses\[0\]\.name.*qcheck.*aggregate\.secure"):
        from_dict({**base(), "defenses": ["qcheck"]})
    with pytest.raises(ConfigError, match=r"schedule\.name.*fedbuff.*aggregate\.secure"):
        from_dict({**base(), "schedule": {"name": "fedbuff"}})
    with pytest.raises(ConfigError, match=r"aggregate\.secure\.k.*even"):
        from_dict(base(secure={"name": "secagg", "graph": "k-regular", "k": 3}))
    with pytest.raises(ConfigError, match=r"aggregate\.secure\.name.*'secagg'"):
        from_dict(base(secure={"name": "secag"}))
    cfg = from_dict({**base(), "defenses": ["global-clip"], "aggregate": {"secure": "secagg"}})
    assert cfg.aggregate.secure == SecAggConfig(name="secagg")  # cloud-side defenses are fine


def test_add_secure_accumulates_a_run_record():
    total: dict = {}
    add_secure(total, {"edge/secagg/aborted": 1.0, "edge/secagg/unmask_up_bytes": 100.0})
    add_secure(total, {"edge/secagg/aborted": 2.0, "edge/secagg/unmask_up_bytes": 200.0})
    add_secure(total, {"edge/rows": 3.0})
    assert total == {"evals": 2.0, "aborted": 3.0, "unmask_up_bytes": 150.0}


def test_stragglers_past_the_deadline_drop_out_of_the_secure_sum(tiny):
    """The cost model drops the devices that miss T_max; the secure edge recovers the sum of
    the others (their pairwise masks removed), so the run ends where the plain run ends."""
    from fedtier.data import load_dataset
    from fedtier.experiment import prepare_arm
    from fedtier.rounds import run_rounds

    data = load_dataset("digits")
    common = {
        "model.name": "mlp",
        "model.options": {},
        "train.rounds": 2,
        "costs.deadline_s": 4.0,
        "costs.stragglers": "drop",
        "topology.clients_per_edge": 6,
    }
    runs = {}
    for arm, secure in (("plain", None), ("secure", {"name": "secagg", "threshold": 2})):
        evals: list = []
        setup = prepare_arm(tiny(**common, **{"aggregate.secure": secure}), data)
        runs[arm] = (run_rounds(setup, evals.append), evals)
    (w_plain, ev_plain), (w_secure, ev_secure) = runs["plain"], runs["secure"]
    stages = {k: sum(e["stages"].get(k, 0.0) for e in ev_secure) for k in ev_secure[-1]["stages"]}
    dropped = ev_secure[-1]["costs"]["dropped"]
    assert 0 < dropped < 24 and stages["edge/secagg/dropped"] == dropped
    assert stages["edge/secagg/aborted"] == 0
    assert ev_plain[-1]["costs"]["dropped"] == dropped
    torch.testing.assert_close(w_secure, w_plain, atol=1e-5, rtol=0)
