"""Stage metrics: each reduces between evaluations as declared, checked against hand
computations from the per-call values of a real run (the deltas the devices trained)."""

import math

import pytest
import torch

from fedtier.data import load_dataset
from fedtier.experiment import prepare_arm
from fedtier.metrics import (
    STAGE_METRICS,
    MetricSpec,
    accumulate,
    declare_stage_metrics,
    reduce_stages,
)
from fedtier.rounds import RunState, run_rounds
from fedtier.security import parameter_mask
from tests.conftest import tiny_config
from tests.test_robust import as_lists, ref_krum_scores


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", None, seed=0)


def recorded_run(cfg, digits, uploaded=False):
    """Run ``cfg``; returns the evaluation records, the global state at each evaluation and
    every device step's (clients, trained deltas [C, P]) in call order — or, with
    ``uploaded``, the deltas as the edge receives them (after the upload chain: the attack's
    stage, clipping, codecs)."""
    setup = prepare_arm(cfg, digits)
    calls = []
    train, chain = setup.executor, setup.upload

    def recording(s, w, clients, step):
        deltas = train(s, w, clients, step)
        if not uploaded:
            calls.append((list(clients), deltas.clone()))
        return deltas

    def recording_chain(deltas, ctx):
        out, m = chain(deltas, ctx)
        if uploaded:
            calls.append((list(ctx.clients), out.clone()))
        return out, m

    setup.executor = recording
    setup.upload = recording_chain
    evals, states = [], []
    run_rounds(setup, evals.append, on_checkpoint=lambda st: states.append(st.w.clone()))
    return setup, evals, states, calls


def test_reduced_stage_metrics_equal_hand_computations_from_each_call(digits):
    max_norm, ratio = 0.5, 0.1
    cfg = tiny_config(
        **{
            "model.name": "mlp",
            "model.options": {},
            "train.rounds": 4,
            "eval.every": 2,
            "upload": [
                {"name": "clip", "max_norm": max_norm},
                {"name": "topk", "ratio": ratio},
            ],
            "defenses": [{"name": "global-clip", "rho0": 1e6}],  # measures, never clips
        }
    )
    setup, evals, states, calls = recorded_run(cfg, digits)
    assert len(evals) == 2 and len(calls) == 8  # 2 evaluations of 2 rounds × 2 edges
    p = setup.layout.size
    k = math.ceil(ratio * p)
    residual: dict[int, torch.Tensor] = {}
    per_call = []
    for clients, deltas in calls:
        norms = [float(row.double().norm()) for row in deltas]
        res_norms = []
        for c, row, n in zip(clients, deltas, norms):
            x = row * min(1.0, max_norm / n) + residual.get(c, torch.zeros(p))
            sent = torch.zeros(p)
            top = sorted(range(p), key=lambda i: -abs(float(x[i])))[:k]
            sent[top] = x[top]
            residual[c] = x - sent
            res_norms.append(float(residual[c].double().norm()))
        per_call.append(
            {
                "mean_norm": sum(norms) / len(norms),
                "clipped": sum(n > max_norm for n in norms),
                "rows": len(clients),
                "residual_norm": sum(res_norms) / len(res_norms),
            }
        )
    mask = parameter_mask(setup)
    for e, record in enumerate(evals):
        window = per_call[4 * e : 4 * e + 4]
        stages = record["stages"]
        assert set(stages) == {
            "client/clip/clipped",
            "client/clip/mean_norm",
            "client/topk/bytes",
            "client/topk/fp32_bytes",
            "client/topk/residual_norm",
            "edge/rows",
            "cloud/rows",
            "server/clip_norm",
            "server/clipped",
            # the edge's validation screen (fedtier.faults): honest uploads all pass
            "edge/faults/nan",
            "edge/faults/inf",
            "edge/faults/wrong_shape",
            "edge/faults/huge_norm",
            "edge/faults/late",
        }
        assert all(v == 0.0 for k, v in stages.items() if k.startswith("edge/faults/"))
        # means over the 4 calls since the last evaluation (not their sum)
        mean_norm = sum(c["mean_norm"] for c in window) / 4
        assert stages["client/clip/mean_norm"] == pytest.approx(mean_norm, rel=1e-5)
        res = sum(c["residual_norm"] for c in window) / 4
        assert stages["client/topk/residual_norm"] == pytest.approx(res, rel=1e-4)
        # counts and bytes sum
        rows = sum(c["rows"] for c in window)
        assert stages["client/clip/clipped"] == sum(c["clipped"] for c in window) > 0
        assert stages["edge/rows"] == rows == 12
        assert stages["client/topk/bytes"] == 8 * k * rows  # k uint32 indices + k float32
        assert stages["client/topk/fp32_bytes"] == 4 * p * rows
        assert stages["cloud/rows"] == 4  # 2 edges in each of 2 rounds
        # the global model's norm before the (inactive) clip: the last round's
        assert stages["server/clip_norm"] == pytest.approx(float(states[e][mask].norm()), rel=1e-6)
        assert stages["server/clipped"] == 0.0
    assert (
        evals[0]["stages"]["client/clip/mean_norm"] != evals[1]["stages"]["client/clip/mean_norm"]
    )


def test_multi_krum_rejections_per_edge_call_match_the_brute_force_selection(digits):
    malicious = [0, 1, 6, 7, 9]
    cfg = tiny_config(
        **{
            "model.name": "mlp",
            "model.options": {},
            "train.rounds": 3,
            "topology.clients": 16,
            "topology.clients_per_edge": 7,
            "aggregate.edge_rule": {"name": "multi-krum", "f": 2},
            "attack.kind": "sign-flip",
            "attack.malicious_ids": malicious,
        }
    )
    setup, evals, _, calls = recorded_run(cfg, digits, uploaded=True)
    assert len(evals) == 3 and len(calls) == 6  # an evaluation after each round of 2 edges
    for t, record in enumerate(evals):
        expected = dict.fromkeys(("rejected_honest", "rejected_malicious"), 0)
        expected.update(dict.fromkeys(("seen_honest", "seen_malicious"), 0))
        for clients, deltas in calls[2 * t : 2 * t + 2]:
            # Multi-Krum's n − f picks (n − f − 2 neighbours), by brute force on the rows
            n = len(clients)
            scores = ref_krum_scores(as_lists(deltas), n - 2 - 2)
            chosen = sorted(range(n), key=lambda i: (scores[i], i))[: n - 2]
            for i, c in enumerate(clients):
                kind = "malicious" if c in malicious else "honest"
                expected[f"seen_{kind}"] += 1
                expected[f"rejected_{kind}"] += i not in chosen
        stages = record["stages"]
        assert {k: stages[f"edge/{k}"] for k in expected} == expected
        assert stages["edge/rejected"] == 2 * 2
        assert expected["seen_malicious"] > 0


def test_reductions_and_declarations():
    values: dict[str, list[float]] = {}
    for m in ({"bytes": 3.0, "mean_norm": 1.0}, {"bytes": 4.0, "mean_norm": 2.0}):
        accumulate(values, "client/x", m)
    accumulate(values, "client/x", {"mean_norm": 6.0})
    accumulate(values, "server", {"clip_norm": 5.0})
    accumulate(values, "server", {"clip_norm": 2.0})
    accumulate(values, "screen", {"max_kl": 0.5})
    accumulate(values, "screen", {"max_kl": 0.25})
    assert values["client/x/mean_norm"] == [1.0, 2.0, 6.0]  # plain data, in call order
    assert reduce_stages(values) == {
        "client/x/bytes": 7.0,
        "client/x/mean_norm": 3.0,
        "server/clip_norm": 2.0,
        "screen/max_kl": 0.5,
    }
    with pytest.raises(KeyError, match="'edge/nosuch' is not declared"):
        accumulate(values, "edge", {"nosuch": 1.0})
    with pytest.raises(ValueError, match="'bytes' is declared with reduce='sum'"):
        declare_stage_metrics({"bytes": MetricSpec("bytes", reduce="mean")})
    assert STAGE_METRICS["bytes"].reduce == "sum"


def test_the_stage_accumulator_survives_a_checkpoint(tmp_path):
    state = RunState(w=torch.zeros(3))
    accumulate(state.stages, "client/clip", {"mean_norm": 1.5, "clipped": 1.0})
    accumulate(state.stages, "client/clip", {"mean_norm": 2.5, "clipped": 0.0})
    torch.save(state.to_dict(), tmp_path / "s.pt")
    back = RunState.from_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert back.stages == state.stages
    assert reduce_stages(back.stages) == {"client/clip/mean_norm": 2.0, "client/clip/clipped": 1.0}
