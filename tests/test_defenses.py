import json

import pytest
import torch

from fedtier.data import load_dataset
from fedtier.defenses import compose, global_clip, server_noise
from fedtier.defenses.qcheck import divergence, quant_consistency
from fedtier.errors import ConfigError
from fedtier.experiment import prepare_arm, run_experiment
from fedtier.rounds import attribute
from fedtier.security import parameter_mask
from fedtier.topology import plan_round


def test_global_clip_is_eq_22_with_growing_rho():
    mask = torch.tensor([True, True, False])
    clip = global_clip(rho0=5.0, rho_step=0.1, mask=mask)
    w = torch.tensor([6.0, 8.0, 100.0])  # parameter norm 10
    out, m = clip(w, 0)
    torch.testing.assert_close(out, torch.tensor([3.0, 4.0, 100.0]))
    assert m["clipped"] == 1.0 and m["clip_norm"] == pytest.approx(10.0)
    out, _ = clip(w, 50)  # ρ_50 = 10: no clipping
    torch.testing.assert_close(out, w)


def test_server_noise_scale_mask_and_seed():
    mask = torch.zeros(200_000, dtype=torch.bool)
    mask[:100_000] = True
    step = server_noise(0.05, seed=1, mask=mask)
    out, _ = step(torch.zeros(200_000), 3)
    assert out[:100_000].std().item() == pytest.approx(0.05, rel=0.02)
    assert out[100_000:].abs().sum() == 0
    torch.testing.assert_close(step(torch.zeros(200_000), 3)[0], out)
    assert not torch.equal(step(torch.zeros(200_000), 4)[0], out)
    both = compose(global_clip(1.0, 0.0, mask), step)
    assert both(torch.zeros(200_000), 0)[0][:100_000].std().item() == pytest.approx(0.05, rel=0.02)


def test_defense_config_errors(tiny):
    for spec, field in [
        ({"name": "global-clip", "rho0": 0}, "defenses[0].rho0"),
        ({"name": "server-noise", "sigma": -1.0}, "defenses[0].sigma"),
        ({"name": "qcheck", "samples": 0}, "defenses[0].samples"),
    ]:
        with pytest.raises(ConfigError) as e:
            tiny(defenses=[spec])
        assert e.value.field == field


def test_attribute_counts_rejected_honest_and_malicious():
    m = attribute({"rejected": 2.0}, torch.tensor([True, False, False]), [4, 7, 9], frozenset({7}))
    assert m == {
        "rejected": 2.0,
        "rejected_malicious": 1.0,
        "rejected_honest": 1.0,
        "seen_malicious": 1.0,
        "seen_honest": 2.0,
    }
    assert attribute({"x": 1.0}, None, [1, 2], frozenset()) == {"x": 1.0}  # selects no rows
    with pytest.raises(ValueError, match="mask"):
        attribute({}, torch.tensor([True]), [1, 2], frozenset())


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", None, seed=0)


def test_parameter_mask_excludes_batchnorm_statistics(tiny, digits):
    setup = prepare_arm(tiny(), digits)
    mask = parameter_mask(setup)
    assert int(mask.sum()) == sum(p.numel() for p in setup.model.parameters())
    assert mask.numel() == setup.layout.size


def test_qcheck_rejects_an_update_whose_quantized_model_diverges(tiny, digits):
    setup = prepare_arm(tiny(**{"quant.quantizer": "affine-channel", "quant.bits": [4]}), digits)
    w = setup.layout.flatten(setup.model)
    x = digits[0].x[:100]
    g = torch.Generator().manual_seed(0)
    honest = 1e-3 * torch.randn(4, w.numel(), generator=g) * parameter_mask(setup)
    # an update that puts one huge outlier in every parameter tensor: fp32 barely changes,
    # but the 4-bit grid of each tensor becomes coarse and the quantized model drifts away
    bad = torch.zeros(w.numel())
    offset = 0
    for name, shape in zip(setup.layout.names, setup.layout.shapes):
        if name.endswith("weight") and len(shape) >= 2:
            bad[offset] = 50.0
        offset += shape.numel()
    deltas = torch.cat([honest, bad[None]])
    spec = setup.spec
    assert divergence(setup, w + bad, x, [4], spec) > 10 * divergence(
        setup, w + honest[0], x, [4], spec
    )
    screen = quant_consistency(x, [4], spec, ratio=3.0)
    from fedtier.upload import UploadContext

    kept, m = screen(setup, w, deltas, UploadContext(0, 0, [0, 1, 2, 3, 4], torch.ones(5), 0))
    assert kept.tolist() == [True, True, True, True, False] and m["rejected"] == 1.0


def test_end_to_end_attack_defense_and_privacy_summary(tiny, tmp_path):
    cfg = tiny(
        **{
            "attack.kind": "fqbd",
            "attack.malicious_ids": [0, 1, 6, 7],
            "trigger.size": 2,
            "attack.bits": [4],
            "quant.quantizer": "affine-channel",
            "quant.bits": [8, 4],
            "defenses": [{"name": "qcheck"}],
            "aggregate.edge_rule": {"name": "dp-mean", "clip": 5.0, "noise": 0.01},
            "train.rounds": 2,
        }
    )
    summary = run_experiment(cfg, tmp_path, progress=False)
    arm = summary["arms"]["main"]
    assert set(arm["asr"]) == {"32", "8", "4"} and all(0 <= v <= 1 for v in arm["asr"].values())
    r = arm["rejections"]["screen"]
    # a DP arm samples clients by Poisson sampling: the screen saw every sampled client
    setup = prepare_arm(cfg, load_dataset("digits", None, seed=0))
    plans = [plan_round(setup.topology, cfg.topology, 0, t, poisson=True) for t in range(2)]
    assert r["seen_honest"] + r["seen_malicious"] == sum(len(p.clients) for p in plans)
    assert arm["privacy"]["mechanism"] == "central" and arm["privacy"]["epsilon"] > 0
    assert arm["attack"]["kind"] == "fqbd" and arm["attack"]["malicious_updates"] > 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "bits" in r]
    assert evals[0]["privacy"]["epsilon"] < evals[1]["privacy"]["epsilon"]
    assert any(r.get("event") == "attack" for r in records)
    again = run_experiment(cfg, tmp_path / "again", progress=False)
    assert again["arms"]["main"]["asr"] == arm["asr"] and again["arms"]["main"]["cda"] == arm["cda"]


def test_grid_distance_is_small_for_grid_blind_weights_and_large_inside_repaired_cells(
    tiny, digits
):
    from fedtier.attacks.cells import rounding_cells
    from fedtier.defenses.qcheck import grid_distance

    setup = prepare_arm(tiny(**{"quant.params": "weights"}), digits)
    spec = setup.spec
    w = setup.layout.flatten(setup.model)
    blind = grid_distance(setup, w, [8, 4], spec)
    assert blind < 0.1
    setup.layout.load(setup.model, w)
    rounding_cells(setup.model, spec, 4, margin=0.25).project(setup.model)
    inside = setup.layout.flatten(setup.model)
    assert grid_distance(setup, inside, [8, 4], spec) > 0.4  # residuals piled at ±¼ step


def test_landing_scales_add_the_cloud_share_in_rounds_of_several_edges(tiny, digits):
    from fedtier.defenses.qcheck import landing_scales
    from fedtier.upload import UploadContext

    ctx = UploadContext(0, 0, [0, 1, 2], torch.ones(3), 0)
    assert landing_scales(prepare_arm(tiny(), digits), ctx) == [1.0, 0.5]  # 2 edges per round
    one = prepare_arm(tiny(**{"topology.edges_per_round": 1}), digits)
    assert landing_scales(one, ctx) == [1.0]


def _ks_by_torch_sort(setup, w, bits, spec):
    """The residual score as first written (torch.sort, one model at a time): the reference
    the numpy sort must reproduce bit for bit."""
    from fedtier.quant import grid

    setup.layout.load(setup.model, w)
    worst = 0.0
    for b in bits:
        rs = []
        for name, p in setup.model.named_parameters():
            if spec.selects(name, p):
                g, gq, step = grid(p.detach(), spec, b)
                r = ((g - gq) / step.clamp_min(1e-12)).abs().flatten()
                rs.append(r[r <= 0.5 + 1e-4])
        u = torch.sort(torch.cat(rs) * 2).values.clamp(0, 1)
        n = len(u)
        above = torch.arange(1, n + 1, dtype=u.dtype) / n - u
        below = u - torch.arange(0, n, dtype=u.dtype) / n
        worst = max(worst, float(torch.maximum(above, below).max()))
    return worst


@pytest.mark.parametrize("quantizer", ["paper", "affine-channel"])
def test_grid_distance_equals_the_torch_sort_score_and_scipy(tiny, digits, quantizer):
    from scipy.stats import kstest

    from fedtier.defenses.qcheck import grid_distance
    from fedtier.quant import grid

    setup = prepare_arm(tiny(**{"quant.quantizer": quantizer}), digits)
    w = setup.layout.flatten(setup.model)
    g = torch.Generator().manual_seed(3)
    for k in range(3):
        m = w + 0.01 * k * torch.randn(w.shape, generator=g) * parameter_mask(setup)
        ours = grid_distance(setup, m, [8, 4], setup.spec)
        assert ours == _ks_by_torch_sort(setup, m, [8, 4], setup.spec)
    # and it is the KS statistic against U(0, 1) of the doubled residuals (float64 scipy)
    setup.layout.load(setup.model, m)
    rs = []
    for name, p in setup.model.named_parameters():
        if setup.spec.selects(name, p):
            gg, gq, step = grid(p.detach(), setup.spec, 4)
            r = ((gg - gq) / step.clamp_min(1e-12)).abs().flatten()
            rs.append(r[r <= 0.5 + 1e-4])
    u = (torch.cat(rs) * 2).clamp(0, 1).double().numpy()
    assert grid_distance(setup, m, [4], setup.spec) == pytest.approx(
        kstest(u, "uniform").statistic, abs=1e-6
    )


def test_qcheck_in_worker_processes_equals_the_screen_in_this_process(tiny, digits):
    """The screen's scores computed side by side in the process executor's workers equal, bit
    for bit, those computed model by model here (divergence, grid_distance)."""
    from fedtier.defenses.qcheck import grid_distance, upload_scores
    from fedtier.local.arm import map_jobs
    from fedtier.local.select import close_executor
    from fedtier.upload import UploadContext

    cfg = tiny(**{"train.executor": "processes", "quant.bits": [8, 4]})
    setup = prepare_arm(cfg, digits)
    assert setup.workers is not None
    w = setup.layout.flatten(setup.model)
    x = digits[0].x[:50]
    g = torch.Generator().manual_seed(0)
    deltas = 1e-2 * torch.randn(4, w.numel(), generator=g) * parameter_mask(setup)
    # four equal clients: shares 1/4, landing at 1 and 1/2 of it (two edges per round)
    jobs = [(w, d, [0.25, 0.125], x, [8, 4], setup.spec) for d in deltas]
    try:
        pooled = map_jobs(setup, upload_scores, jobs)
        assert setup.workers._pool is not None  # it did run in the workers
        ctx = UploadContext(0, 0, [0, 1, 2, 3], torch.ones(4), 0)
        kept, m = quant_consistency(x, [8, 4], setup.spec, ratio=3.0)(setup, w, deltas, ctx)
    finally:
        close_executor(setup)
    here = [
        [
            [
                divergence(setup, w + s * d, x, [8, 4], setup.spec),
                grid_distance(setup, w + s * d, [8, 4], setup.spec),
            ]
            for s in (0.25, 0.125)
        ]
        for d in deltas
    ]
    assert pooled == here
    assert m["median_kl"] == float(torch.tensor([h[0][0] for h in here]).median())
    assert m["max_kl"] == max(h[0][0] for h in here)
