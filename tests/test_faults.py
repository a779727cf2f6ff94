"""Faults at every tier (fedtier.faults): each injected fault is counted in metrics.jsonl, the
validation screen rejects broken uploads before any rule and never an honest one, and no fault
stops a run. Expected counts come from the documented streams (fedtier.seeding) and from the
cost model's own ledger, not from the round loop."""

import copy
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtier.config import from_dict, to_dict
from fedtier.data import load_dataset
from fedtier.errors import ConfigError
from fedtier.experiment import prepare_arm, run_experiment
from fedtier.faults import UPLOAD_FAULTS, corrupt, pick, screen_uploads
from fedtier.rounds import RunState, edge_step, run_rounds
from fedtier.seeding import numpy_rng
from fedtier.topology import plan_round
from tests.conftest import tiny_config

ROUNDS = 3


def faulty(**overrides):
    """The tiny run (12 clients on 2 edges, 3 sampled per edge, 3 rounds) with an MLP."""
    return tiny_config(
        **{
            "model.name": "mlp",
            "model.options": {},
            "quant.eval_bits": [32],
            "train.rounds": ROUNDS,
            **overrides,
        }
    )


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def run_dir(cfg, tmp_path):
    out = tmp_path / "run"
    run_experiment(cfg, out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "bits" in r]
    return evals, json.loads((out / "summary.json").read_text())


def total(evals, key):
    return sum(r["stages"].get(key, 0.0) for r in evals)


def events(evals):
    return [e for r in evals for e in r.get("faults", [])]


# --- the screen --------------------------------------------------------------------------


def test_screen_rejects_each_cause_and_nothing_else():
    g = torch.Generator().manual_seed(0)
    rows = list(torch.randn(7, 5, generator=g).unbind(0))
    rows[1] = torch.tensor([1.0, float("nan"), 0.0, 0.0, 0.0])
    rows[2] = torch.tensor([float("-inf"), 0.0, 0.0, 0.0, 0.0])
    rows[3] = torch.ones(4)  # one entry short
    rows[4] = torch.full((5,), 1e3)  # ‖Δ‖ = 2236 > 1000
    rows[5] = torch.tensor([float("nan"), float("inf"), 0.0, 0.0, 0.0])  # NaN counts first
    block, ok, counts = screen_uploads(rows, 5, max_norm=1000.0)
    assert ok.tolist() == [True, False, False, False, False, False, True]
    assert counts == {"nan": 2.0, "inf": 1.0, "wrong_shape": 1.0, "huge_norm": 1.0}
    assert block.shape == (7, 5) and torch.isfinite(block).all()
    assert torch.equal(block[0], rows[0]) and torch.equal(block[6], rows[6])
    assert not block[~ok].any()  # rejected rows never reach anything as values


def test_screen_norm_bound_is_inclusive_and_in_float64():
    row = torch.tensor([3.0, 4.0])  # ‖Δ‖ = 5 exactly
    assert screen_uploads(row[None], 2, max_norm=5.0)[1].tolist() == [True]
    assert screen_uploads(row[None], 2, max_norm=4.999)[1].tolist() == [False]
    # entries whose float32 squares overflow: the norm is still measured (not inf → NaN)
    big = torch.full((1, 4), 3e19)
    _, ok, counts = screen_uploads(big, 4, max_norm=1e21)
    assert ok.tolist() == [True] and counts["huge_norm"] == 0.0


@settings(max_examples=100, deadline=None, derandomize=True)
@given(
    st.integers(1, 6),
    st.integers(1, 20),
    st.floats(1e-6, 1e6),
    st.integers(0, 2**31 - 1),
)
def test_screen_never_rejects_a_finite_upload_within_the_bound(c, p, norm, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(c, p, generator=g, dtype=torch.float64)
    u = u / u.norm(dim=1, keepdim=True) * norm * torch.rand(c, 1, generator=g, dtype=u.dtype)
    u = u.float()
    block, ok, counts = screen_uploads(u, p, max_norm=norm * 1.0001)
    assert bool(ok.all()) and not any(counts.values())
    assert block is u  # the clean path does not copy the block


def test_corrupt_injects_each_fault_as_documented():
    d = torch.arange(1.0, 13.0).reshape(3, 4)
    rows = corrupt(d, ["nan", None, "huge_norm"], absurd_norm=1e9)
    assert math.isnan(rows[0][0]) and torch.equal(rows[0][1:], d[0, 1:])
    assert rows[1] is not None and torch.equal(rows[1], d[1])
    assert float(rows[2].double().norm()) == pytest.approx(1e9, rel=1e-6)
    assert torch.equal(corrupt(d, [None, "wrong_shape", None], 1.0)[1], d[1, :3])
    assert math.isinf(corrupt(d, ["inf", None, None], 1.0)[0][0])
    assert torch.equal(d, torch.arange(1.0, 13.0).reshape(3, 4))  # the sender's block is intact


def test_pick_by_probability_is_keyed_by_id_and_by_count_is_exact():
    a = pick(0.5, [3, 7, 9, 11], seed=4, stage="fault-dropout", t=2, group=0)
    b = pick(0.5, [11, 9], seed=4, stage="fault-dropout", t=2, group=0)
    assert [a[3], a[2]] == b  # a client's draw does not depend on who else was sampled
    assert a == [numpy_rng(4, "fault-dropout", 2, c).random() < 0.5 for c in [3, 7, 9, 11]]
    for t in range(20):
        hit = pick(2, [1, 2, 3, 4, 5], seed=0, stage="fault-edge", t=t, group=0)
        assert sum(hit) == 2
    assert pick(9, [1, 2], 0, "x", 0, 0) == [True, True]
    assert pick(0.0, [1, 2], 0, "x", 0, 0) == [False, False]


# --- config ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"faults.nan": 0.6, "faults.inf": 0.5}, "faults.nan"),
        ({"faults.dropout": 1.5}, "faults.dropout"),
        ({"faults.edge_failure": 2.5}, "faults.edge_failure"),
        ({"faults.nan": 1.5}, "faults.nan"),
        ({"faults.max_norm": 0.0}, "faults.max_norm"),
        ({"faults.nan": 0.1, "schedule.name": "fedasync"}, "schedule.name"),
        ({"faults.nanx": 0.1}, "faults.nanx"),
    ],
)
def test_bad_fault_settings_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as e:
        faulty(**overrides)
    assert e.value.field == field


def test_old_configs_stay_valid_and_round_trip():
    cfg = faulty()
    assert not cfg.faults.injects() and cfg.faults.max_norm == 1e6
    cfg = faulty(**{"faults.nan": 0.1, "faults.dropout": 2})
    assert from_dict(to_dict(cfg)) == cfg and cfg.faults.injects()


# --- through the real round loop -----------------------------------------------------------


def upload_fault_of(seed, step, client, shares):
    """The documented draw: one uniform per (step, client), shares laid end to end."""
    u = numpy_rng(seed, "fault-upload", step, client).random()
    edges = np.cumsum(shares)
    i = int(np.searchsorted(edges, u, side="right"))
    return UPLOAD_FAULTS[i] if i < len(UPLOAD_FAULTS) else None


def test_every_upload_broken_keeps_the_model_and_counts_each_cause(tmp_path, digits):
    shares = [0.25, 0.25, 0.25, 0.25]
    cfg = faulty(**dict(zip([f"faults.{n}" for n in UPLOAD_FAULTS], shares)))
    evals, summary = run_dir(cfg, tmp_path)
    assert summary["arms"]["main"]["rounds"] == ROUNDS and len(evals) == ROUNDS
    expected = dict.fromkeys(UPLOAD_FAULTS, 0)
    for t in range(ROUNDS):
        plan = plan_round(prepare_arm(cfg, digits).topology, cfg.topology, cfg.seed, t)
        for clients in plan.edges.values():
            for c in clients:
                expected[upload_fault_of(cfg.seed, t, c, shares)] += 1
    assert sum(expected.values()) == ROUNDS * 2 * 3 and min(expected.values()) > 0
    for name in UPLOAD_FAULTS:
        assert total(evals, f"edge/faults/{name}") == expected[name]
    # per (round, edge) in the records, adding up to the same counts
    per_edge = events(evals)
    assert {(e["round"], e["edge"]) for e in per_edge if "edge" in e} == {
        (t, e) for t in range(ROUNDS) for e in (0, 1)
    }
    for name in UPLOAD_FAULTS:
        assert sum(e.get(name, 0) for e in per_edge) == expected[name]
    # nothing reached any edge: every round kept the model, and said so
    assert total(evals, "cloud/faults/no_update_rounds") == ROUNDS
    assert total(evals, "edge/rows") == 0
    setup = prepare_arm(cfg, digits)
    w0 = setup.layout.flatten(setup.model)
    assert torch.equal(run_rounds(setup, lambda r: None), w0)
    acc = summary["arms"]["main"]["cda"]["32"]
    assert 0.0 <= acc <= 1.0


def test_nan_uploads_are_screened_before_a_robust_rule(digits):
    """With 20% NaN uploads Krum runs on the others: it sees every upload but the NaN ones,
    and the model stays finite."""
    krum = {"aggregate.edge_rule": {"name": "krum", "f": 0}, "topology.clients_per_edge": 5}
    cfg = faulty(**krum, **{"faults.nan": 0.2})
    evals = []
    w = run_rounds(prepare_arm(cfg, digits), evals.append)
    assert torch.isfinite(w).all()
    nans = sum(r["stages"]["edge/faults/nan"] for r in evals)
    assert nans > 0 and total(evals, "edge/faults/too_few_rows") == 0
    seen = sum(r["stages"]["edge/seen_honest"] for r in evals)
    assert seen == ROUNDS * 2 * 5 - nans  # Krum saw every upload but the NaN ones


def test_dropouts_by_count_and_stragglers_are_counted(tmp_path, digits):
    cfg = faulty(
        **{
            "faults.dropout": 1,
            "topology.clients_per_edge": 4,
            "costs.deadline_s": 5.0,
            "costs.stragglers": "drop",
        }
    )
    evals, summary = run_dir(cfg, tmp_path)
    assert total(evals, "edge/faults/dropped_out") == ROUNDS * 2  # one per edge and round
    assert all(e["dropped_out"] == 1 for e in events(evals) if "edge" in e)
    # stragglers past the deadline: the cost model's own count of dropped updates
    late = total(evals, "edge/faults/late")
    assert late == summary["arms"]["main"]["costs"]["dropped"] > 0
    assert total(evals, "edge/rows") == ROUNDS * 2 * 3 - late  # the others were aggregated


def test_dropout_by_probability_follows_its_stream(tmp_path, digits):
    cfg = faulty(**{"faults.dropout": 0.4})
    evals, _ = run_dir(cfg, tmp_path)
    topo = prepare_arm(cfg, digits).topology
    expected = 0
    for t in range(ROUNDS):
        for clients in plan_round(topo, cfg.topology, cfg.seed, t).edges.values():
            expected += sum(
                numpy_rng(cfg.seed, "fault-dropout", t, c).random() < 0.4 for c in clients
            )
    assert 0 < total(evals, "edge/faults/dropped_out") == expected
    assert total(evals, "edge/rows") == ROUNDS * 2 * 3 - expected


def test_a_failed_edge_leaves_the_cloud_the_other(digits):
    cfg = faulty(**{"faults.edge_failure": 1})
    evals = []
    w = run_rounds(prepare_arm(cfg, digits), evals.append)
    failed = [e for e in events(evals) if e.get("failed")]
    assert (
        len(failed) == ROUNDS
        and sum(r["stages"]["cloud/faults/failed_edges"] for r in evals) == ROUNDS
    )
    assert all(r["stages"]["cloud/rows"] == 1 for r in evals)  # the cloud aggregated one edge
    assert all(r["stages"]["edge/rows"] == 3 for r in evals)  # the failed edge trained no one
    assert torch.isfinite(w).all()
    # the surviving edge's update is the whole round: the same as a run in which the failed
    # edge's clients all dropped out (their edge then sends nothing either)
    fails = {e["round"]: e["edge"] for e in failed}
    setup = prepare_arm(faulty(), digits)
    w0 = setup.layout.flatten(setup.model)
    state = RunState(w=w0.clone())
    for t in range(ROUNDS):
        plan = plan_round(setup.topology, setup.cfg.topology, 0, t)
        (live,) = [e for e in plan.edges if e != fails[t]]
        result = edge_step(setup, state, state.w, live, plan.edges[live], t)
        state.w = state.w + result.delta  # fedavg, server lr 1: the one edge's mean
    torch.testing.assert_close(w, state.w)


def test_all_edges_failed_keeps_the_model_and_is_recorded(tmp_path, digits):
    cfg = faulty(**{"faults.edge_failure": 2})
    evals, summary = run_dir(cfg, tmp_path)
    assert total(evals, "cloud/faults/failed_edges") == 2 * ROUNDS
    assert total(evals, "cloud/faults/no_update_rounds") == ROUNDS
    assert summary["arms"]["main"]["faults"] == {
        "cloud/faults/failed_edges": 2.0 * ROUNDS,
        "cloud/faults/no_update_rounds": 1.0 * ROUNDS,
    }
    assert [e for e in events(evals) if e.get("no_update")] == [
        {"round": t, "no_update": True} for t in range(ROUNDS)
    ]


def test_too_few_rows_for_the_rule_skips_the_aggregation_not_the_run(digits):
    # Krum with f = 1 needs 5 rows; 5 are sampled, so every dropout leaves too few
    cfg = faulty(
        **{
            "aggregate.edge_rule": {"name": "krum", "f": 1},
            "topology.clients_per_edge": 5,
            "faults.dropout": 1,
        }
    )
    evals = []
    w = run_rounds(prepare_arm(cfg, digits), evals.append)
    assert sum(r["stages"]["edge/faults/too_few_rows"] for r in evals) == 2 * ROUNDS
    assert sum(r["stages"]["cloud/faults/no_update_rounds"] for r in evals) == ROUNDS
    setup = prepare_arm(cfg, digits)
    assert torch.equal(w, setup.layout.flatten(setup.model))
    # without a fault the same shortage is the user's configuration: a clear error
    short = faulty(
        **{"aggregate.edge_rule": {"name": "krum", "f": 1}, "topology.clients_per_edge": 4}
    )
    with pytest.raises(ConfigError, match=r"aggregate.edge_rule.*n > 2f \+ 2"):
        run_rounds(prepare_arm(short, digits), lambda r: None)


def test_faults_are_deterministic_and_resume_exactly(digits):
    cfg = faulty(**{"faults.nan": 0.2, "faults.dropout": 0.2, "faults.edge_failure": 0.3})
    saved, evals = [], []
    a = run_rounds(
        prepare_arm(cfg, digits),
        evals.append,
        on_checkpoint=lambda state: saved.append(copy.deepcopy(state.to_dict())),
    )
    assert events(evals)  # something happened
    b = run_rounds(prepare_arm(cfg, digits), lambda r: None)
    assert torch.equal(a, b)
    resumed_evals = []
    resumed = run_rounds(
        prepare_arm(cfg, digits), resumed_evals.append, state=RunState.from_dict(saved[0])
    )
    assert torch.equal(a, resumed)
    assert [r.get("faults") for r in resumed_evals] == [r.get("faults") for r in evals[1:]]
