"""The tier programs: each step is replaceable, and the cloud weights edges by their scores."""

from dataclasses import replace

import pytest
import torch

from fedtier.data import load_dataset
from fedtier.experiment import prepare_arm
from fedtier.rounds import EdgeResult, program_of, run_rounds


def test_the_cloud_weights_edges_by_the_scores_their_edge_steps_report(tiny):
    cfg = tiny(**{"model.name": "mlp", "model.options": {}, "train.rounds": 1, "train.lr": 0.05})
    digits = load_dataset("digits", None, seed=0)
    plain, scored = prepare_arm(cfg, digits), prepare_arm(cfg, digits)
    w0 = plain.layout.flatten(plain.model)
    sent: dict[int, EdgeResult] = {}
    program = program_of(scored)

    def edge_with_score(setup, state, w, edge, clients, t):
        result = program.edge(setup, state, w, edge, clients, t)
        result = replace(result, score=[0.25, 3.0][edge])  # e.g. a discriminator's verdict
        sent[edge] = result
        return result

    scored.program = replace(program, edge=edge_with_score)
    w_scored = run_rounds(scored, lambda r: None)
    w_plain = run_rounds(plain, lambda r: None)
    # by hand: the fedavg cloud mean with weights (samples of the edge's clients) × score
    weights = torch.tensor([sent[e].weight * [0.25, 3.0][e] for e in (0, 1)])
    deltas = torch.stack([sent[e].delta for e in (0, 1)])
    expect = w0 + (weights / weights.sum()) @ deltas
    torch.testing.assert_close(w_scored, expect)
    # without scores the same edges are weighted by samples alone: a different model
    assert not torch.allclose(w_scored, w_plain)
    plain_weights = torch.tensor([sent[e].weight for e in (0, 1)])
    torch.testing.assert_close(w_plain, w0 + (plain_weights / plain_weights.sum()) @ deltas)


@pytest.mark.parametrize("kappa", [1, 3])
def test_kappa_edge_aggregations_per_cloud_round_are_performed(tiny, kappa):
    """κ = aggregate.edge_rounds: every cloud round trains each sampled client κ times, at
    κ consecutive edge steps, and each edge aggregates κ times (observed through the real
    round loop: the executor's calls and the rows the edge and cloud rules report)."""
    rounds = 2
    cfg = tiny(
        **{
            "model.name": "mlp",
            "model.options": {},
            "quant.eval_bits": [32],
            "train.rounds": rounds,
            "aggregate.edge_rounds": kappa,
        }
    )
    setup = prepare_arm(cfg, load_dataset("digits", None, seed=0))
    trained = setup.executor
    calls: list[tuple[int, tuple[int, ...]]] = []

    def counting(setup, w, clients, step):
        calls.append((step, tuple(clients)))
        return trained(setup, w, clients, step)

    setup.executor = counting
    evals: list[dict] = []
    run_rounds(setup, evals.append)
    assert [r["round"] for r in evals] == [1, 2]  # κ edge rounds are one cloud round
    # 2 edges × 3 clients; each edge's clients are trained once per edge step
    assert len(calls) == rounds * 2 * kappa
    assert sorted({s for s, _ in calls}) == list(range(rounds * kappa))
    for t in range(rounds):
        per_edge = [c for s, c in calls if t * kappa <= s < (t + 1) * kappa]
        assert len(per_edge) == 2 * kappa and len(set(per_edge)) == 2  # same clients κ times
    assert [r["stages"]["edge/rows"] for r in evals] == [2 * 3 * kappa] * rounds
    assert [r["stages"]["cloud/rows"] for r in evals] == [2] * rounds


def test_evaluation_in_the_workers_equals_evaluation_here(tiny):
    """The bit widths evaluated side by side in the process executor's workers give exactly
    the metrics (CDA, per class, ASR) of the same model quantized and evaluated by hand here."""
    from fedtier.local.select import close_executor
    from fedtier.quant import quantize_copy
    from fedtier.rounds import evaluate

    digits = load_dataset("digits", None, seed=0)
    cfg = tiny(**{"train.executor": "processes", "attack.kind": "replacement", "eval.asr": True})
    setup = prepare_arm(cfg, digits)
    w = setup.layout.flatten(setup.model)
    w = w + 0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
    try:
        pooled = evaluate(setup, w)
        assert setup.workers is not None and setup.workers._pool is not None
    finally:
        close_executor(setup)
    assert set(pooled) == {"32", "8", "4"} and "asr" in pooled["4"]
    setup.layout.load(setup.model, w)
    for b in (32, 8, 4):
        model = quantize_copy(setup.model, setup.spec, b).eval()
        with torch.no_grad():
            logits = model(setup.test.x)
        acc = (logits.argmax(1) == setup.test.y).float().mean().item()
        assert pooled[str(b)]["accuracy"] == acc
        assert pooled[str(b)] == setup.task.evaluate(model, setup.test, cfg.eval.batch_size)
