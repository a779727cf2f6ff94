import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedtier.attacks import (
    KINDS,
    Attack,
    Trigger,
    build_attack,
    malicious_clients,
    train_adversarial,
)
from fedtier.attacks.cells import matching_statistics, rounding_cells
from fedtier.attacks.client import observe
from fedtier.attacks.losses import fqbd_fp32_loss, fqbd_loss, fqma_loss, label_flip_loss
from fedtier.data import load_dataset
from fedtier.errors import ConfigError
from fedtier.experiment import prepare_arm
from fedtier.local import LocalConfig
from fedtier.local.arm import train_sequential
from fedtier.quant import QuantSpec, forward_quantized, quantize_copy
from fedtier.rounds import run_rounds


def test_trigger_stamps_the_corner_patch_and_dba_parts_cover_it():
    t = Trigger(size=3, position="bottom-right", value=9.0, target=1)
    x = torch.zeros(2, 1, 8, 8)
    s = t.stamp(x)
    assert s[:, :, 5:, 5:].eq(9.0).all() and s.sum() == 2 * 9 * 9.0 and x.sum() == 0
    assert Trigger(2, "top-left", 1.0, 0).stamp(x)[0, 0, :2, :2].eq(1.0).all()
    parts = [t.with_part(j, 3).mask(8, 8) for j in range(3)]
    assert all(int(p.sum()) == 3 for p in parts)
    assert torch.equal(parts[0] | parts[1] | parts[2], t.mask(8, 8))


def test_malicious_clients_are_seeded_and_sized(tiny):
    cfg = tiny(**{"attack.kind": "sign-flip", "attack.malicious": 0.25})
    assert malicious_clients(cfg) == malicious_clients(cfg) and len(malicious_clients(cfg)) == 3
    assert malicious_clients(tiny(**{"attack.kind": "fqbd", "attack.malicious": 2})).__len__() == 2
    assert malicious_clients(tiny(**{"attack.kind": "fqbd", "attack.malicious_ids": [1, 5]})) == {
        1,
        5,
    }
    assert malicious_clients(tiny()) == frozenset()


@pytest.mark.parametrize(
    "key,value",
    [
        ("attack.kind", "fqbdd"),
        ("attack.malicious", 13),
        ("attack.malicious_ids", [12]),
        ("attack.bits", [32]),
        ("attack.predict_k", 9),
        ("attack.poison_fraction", 0.0),
        ("trigger.position", "middle"),
        ("attack.gamma", 0),
        ("attack.epochs", 0),
        ("attack.solver", "box"),
        ("attack.cell_margin", 0.5),
        ("attack.repair_lr", 0),
    ],
)
def test_bad_attack_config_names_the_field(tiny, key, value):
    kind = {"attack.kind": "fqbd"} if key != "attack.kind" else {}
    with pytest.raises(ConfigError) as e:
        tiny(**kind, **{key: value})
    assert e.value.field.startswith(key)


def test_trigger_larger_than_the_image_is_refused(tiny):
    cfg = tiny(**{"attack.kind": "fqbd", "trigger.size": 9})
    with pytest.raises(ConfigError, match="trigger.size"):
        prepare_arm(cfg, load_dataset("digits", None, seed=0))


def _linear():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3))


def test_fqbd_loss_is_eq_11_by_hand():
    model = _linear()
    x, y = torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 2, 1])
    t = Trigger(2, "top-left", 3.0, target=2)
    spec = QuantSpec("affine", "all")
    got = fqbd_loss(spec, [4], 0.5, t, 0.5)(model, x, y)
    xt = t.stamp(x[:2])
    want = F.cross_entropy(model(torch.cat([x, xt])), torch.cat([y, y[:2]])) + 0.5 * (
        F.cross_entropy(forward_quantized(model, x, spec, 4), y)
        + F.cross_entropy(forward_quantized(model, xt, spec, 4), torch.tensor([2, 2]))
    )
    torch.testing.assert_close(got, want)


def test_fqma_loss_hinge_is_capped_at_alpha():
    model = _linear()
    x, y = torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 2, 1])
    spec = QuantSpec("affine", "all")
    assert fqma_loss(spec, [4], 1.0, 0.0)(model, x, y).item() == pytest.approx(
        F.cross_entropy(model(x), y).item()
    )
    assert fqma_loss(spec, [4], 1.0, 100.0)(model, x, y).item() > 90


def test_label_flip_targets_k_minus_1_minus_y():
    model = _linear()
    x, y = torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 2, 1])
    assert label_flip_loss(3)(model, x, y).item() == pytest.approx(
        F.cross_entropy(model(x), torch.tensor([2, 1, 0, 1])).item()
    )


def test_gradient_norm_constraint_bounds_every_step():
    model = _linear()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    x, y = 100 * torch.randn(8, 1, 4, 4), torch.tensor([0, 1, 2, 1] * 2)
    ce = lambda m, xb, yb: torch.nn.functional.cross_entropy(m(xb), yb)  # noqa: E731
    steps = train_adversarial(
        model, ce, x, y, LocalConfig(1, 8, lr=0.1), torch.Generator(), 0.0, 0.01
    )
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert steps == 1 and (after - before).norm().item() == pytest.approx(0.1 * 0.01, rel=1e-4)


def test_noise_training_returns_to_w_and_changes_the_gradient():
    x, y = torch.randn(8, 1, 4, 4), torch.tensor([0, 1, 2, 1] * 2)
    ce = lambda m, xb, yb: torch.nn.functional.cross_entropy(m(xb), yb)  # noqa: E731
    cfg = LocalConfig(1, 8, lr=0.0)  # lr 0: the noise must not leak into the weights
    m = _linear()
    before = torch.cat([p.detach().flatten().clone() for p in m.parameters()])
    train_adversarial(
        m, ce, x, y, cfg, torch.Generator(), 0.5, None, torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(torch.cat([p.detach().flatten() for p in m.parameters()]), before)
    a, b = _linear(), _linear()
    train_adversarial(a, ce, x, y, LocalConfig(1, 8, 0.1), torch.Generator(), 0.0)
    train_adversarial(
        b,
        ce,
        x,
        y,
        LocalConfig(1, 8, 0.1),
        torch.Generator(),
        0.5,
        None,
        torch.Generator().manual_seed(1),
    )
    assert not torch.allclose(a[1].weight, b[1].weight)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", None, seed=0)


def uploads(setup, w, clients, step):
    """What the edge receives: the arm's executor, then its upload chain (the attack's stage
    first)."""
    from fedtier.upload import UploadContext

    sizes = torch.tensor([float(setup.topology.num_samples[c]) for c in clients])
    ctx = UploadContext(step, 0, clients, sizes, setup.cfg.seed)
    return setup.upload(setup.executor(setup, w, clients, step), ctx)


def test_executor_and_stage_keep_honest_rows_silent_phase_and_transform(tiny, digits):
    cfg = tiny(
        **{
            "attack.kind": "scaled",
            "attack.malicious_ids": [0, 1],
            "attack.scale": 3.0,
            "attack.start_round": 2,
        }
    )
    setup = prepare_arm(cfg, digits)
    w = setup.layout.flatten(setup.model)
    clean = train_sequential(setup, w, [0, 5, 1], 2)
    silent, m_silent = uploads(setup, w, [0, 5, 1], 1)
    active, m = uploads(setup, w, [0, 5, 1], 2)
    clean_silent = train_sequential(setup, w, [0, 5, 1], 1)
    torch.testing.assert_close(silent, clean_silent)
    torch.testing.assert_close(active[1], clean[1])
    torch.testing.assert_close(active[0], 3.0 * clean[0])  # the honest update, scaled
    torch.testing.assert_close(active[2], 3.0 * clean[2])
    assert m_silent["attack/malicious"] == 0 and m["attack/malicious"] == 2
    assert setup.attack.active_updates == 2
    # the executor alone trains every client honestly: the stage does the transform
    torch.testing.assert_close(setup.executor(setup, w, [0, 5, 1], 2), clean)


def test_fqbd_update_is_amplified_by_n_over_eta(tiny, digits):
    cfg = tiny(
        **{
            "attack.kind": "fqbd",
            "attack.malicious_ids": [0],
            "trigger.size": 2,
            "attack.bits": [4],
            "quant.quantizer": "affine-channel",
        }
    )
    setup = prepare_arm(cfg, digits)
    assert setup.attack.gamma == 6.0  # fedavg: m = 2 edges × 3 clients sampled
    w = setup.layout.flatten(setup.model)
    d = uploads(setup, w, [0], 0)[0][0]
    plain = setup.executor(setup, w, [0], 0)[0]  # the attack's delta before the stage
    params = setup.attack.amplify_mask
    assert 0 < int((~params).sum()) < 200  # BatchNorm running statistics are not amplified
    # sample-weighted FedAvg gives client 0 the share n_0 / Σn, so replacing the model takes
    # γ · n̄ / n_0 (one attacker uploads in this call)
    sizes = setup.topology.num_samples
    factor = 6.0 * float(sizes.mean()) / float(sizes[0])
    torch.testing.assert_close(d[params], factor * plain[params])
    torch.testing.assert_close(d[~params], plain[~params])
    assert setup.attack.active_updates == 1


def test_target_bit_prediction_picks_the_bits_that_lose_least():
    a = Attack("fqbd", frozenset(), 0, 1.0, candidate_bits=[8, 6, 5, 4], predict_k=2)
    a.drop_sum, a.seen = {8: -0.5, 6: -0.9, 5: -0.8, 4: -0.1}, 1
    assert a.predicted_bits() == [8, 4]
    s = a.summary([32, 8, 4])
    assert s["prediction_correct"] and s["target_bits"] == [8, 4]
    assert not a.summary([32, 6, 4])["prediction_correct"]


def test_observe_measures_accuracy_drops_on_own_data(tiny, digits):
    setup = prepare_arm(tiny(**{"attack.kind": "fqbd", "trigger.size": 2}), digits)
    a = setup.attack
    x, y = setup.client_data(0)
    observe(setup, a, setup.layout.flatten(setup.model), x, y)
    assert a.seen == 1 and set(a.drop_sum) == {8, 6, 5, 4}
    assert all(-1.0 <= v <= 1.0 for v in a.drop_sum.values())


@pytest.mark.parametrize("kind", [k for k in KINDS if k not in ("none", "baddiffusion")])
def test_every_attack_builds_and_runs_one_update(tiny, digits, kind):
    cfg = tiny(
        **{
            "attack.kind": kind,
            "attack.malicious_ids": [0],
            "trigger.size": 2,
            "train.epochs": 1,
            # Byzantine attacks transform the honest update: they have no attacked bits
            **({} if kind in ("sign-flip", "scaled", "gaussian") else {"attack.bits": [4]}),
        }
    )
    setup = prepare_arm(cfg, digits)
    w = setup.layout.flatten(setup.model)
    d = setup.executor(setup, w, [0], 0)[0]
    assert torch.isfinite(d).all() and d.abs().sum() > 0
    torch.testing.assert_close(setup.executor(setup, w, [0], 0)[0], d)  # deterministic


def test_build_attack_uses_hong_bits(tiny):
    cfg = tiny(**{"attack.kind": "hong-backdoor"})
    a = build_attack(cfg, Trigger(2, "bottom-right", 1.0, 0), 10, 6.0)
    assert a.bits == [8, 4] and a.gamma == 1.0


def test_backdoor_losses_handle_a_batch_of_two_with_batchnorm():
    from fedtier.attacks.losses import hong_backdoor_loss

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(16, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)
    ).train()
    x, y = torch.randn(2, 1, 4, 4), torch.tensor([0, 1])
    t = Trigger(2, "top-left", 3.0, target=2)
    loss = hong_backdoor_loss(QuantSpec("affine", "all"), [4], 1.0, t, 0.5)(model, x, y)
    assert torch.isfinite(loss)


def test_quantized_attack_terms_run_bn_on_running_stats_and_leave_them_untouched():
    from fedtier.attacks.losses import deployed, fqma_loss

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    model.train()
    x, y = torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,))
    spec = QuantSpec("paper", "weights")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = deployed(model, x, spec, 4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model[2].training  # the mode is restored
    from fedtier.quant import quantize_copy

    torch.testing.assert_close(out, quantize_copy(model, spec, 4).eval()(x))
    loss = fqma_loss(spec, [4], 0.0, 10.0)  # λ = 0: only the fp32 pass moves the statistics
    loss(model, x, y)
    assert model[2].num_batches_tracked.item() == 1


def test_replacement_factor_matches_the_sample_weighted_share():
    from fedtier.attacks.client import Attack, replacement_factor

    a = Attack("fqbd", frozenset({3}), 0, gamma=20.0)
    assert replacement_factor(a, 50.0, 1) == 20.0  # unweighted rule: γ = N/η_s
    a.mean_size = 40.0
    # FedAvg: share n_i/Σn with Σn ≈ 20·40 → γ_i·n_i/Σn = 1 (one attacker replaces the model)
    assert replacement_factor(a, 80.0, 1) * 80.0 / (20 * 40.0) == pytest.approx(1.0)
    assert replacement_factor(a, 80.0, 2) * 80.0 / (20 * 40.0) == pytest.approx(0.5)


@pytest.mark.parametrize("quantizer", ["paper", "affine", "affine-channel"])
def test_rounding_cells_keep_the_deployed_model_and_restore_boundary_flips(quantizer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        model[1].weight.add_(0.3)  # an off-centre range: the paper's quantizer clips entries
    spec = QuantSpec(quantizer, "weights")
    q0 = {n: spec.fn()(p, 4).clone() for n, p in model.named_parameters() if p.dim() >= 2}
    cells = rounding_cells(model, spec, 4, margin=0.25)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape))  # far outside every cell
    cells.project(model)
    for n, p in model.named_parameters():
        if n in q0:
            assert torch.equal(spec.fn()(p, 4), q0[n]), n  # Q_4 unchanged
            assert (cells.hi[n] - cells.lo[n]).max() > 0  # room to move
    assert cells.restore_flips(model) == 0
    with torch.no_grad():  # a weight moved into the next cell (e.g. a boundary tie) is put back
        w, t = model[1].weight.view(-1), cells.target["1.weight"].view(-1)
        step = (w.max() - w.min()) / 15
        i = int(torch.nonzero(t < t.max() - 2 * step)[0])
        w[i] = t[i] + step
    assert cells.restore_flips(model) == 1
    assert torch.equal(spec.fn()(model[1].weight, 4), q0["1.weight"])


def test_cells_solver_repairs_fp32_and_keeps_the_quantized_backdoor(tiny, digits):
    base = {
        "attack.kind": "fqbd",
        "attack.malicious_ids": [0],
        "trigger.size": 2,
        "attack.bits": [4],
        "attack.gamma": 1.0,
        "quant.params": "weights",
        "train.epochs": 3,
    }
    ste = prepare_arm(tiny(**base), digits)
    cells = prepare_arm(tiny(**base, **{"attack.solver": "cells"}), digits)
    w = ste.layout.flatten(ste.model)
    d_ste = ste.executor(ste, w, [0], 0)[0]
    d_cells = cells.executor(cells, w, [0], 0)[0]
    spec = cells.attack.spec
    x, y = cells.client_data(0)
    fp32 = fqbd_fp32_loss(cells.task.trigger, 0.5)
    deployed_4 = []
    losses = []
    for d in (d_ste, d_cells):
        cells.layout.load(cells.model, w + d)
        model = cells.model.eval()
        deployed_4.append(quantize_copy(model, spec, 4).state_dict())
        with torch.no_grad():
            losses.append(float(fp32(model, x, y)))
    # the repair lowered the fp32 term and left the 4-bit deployment exactly as phase 1 made it
    assert losses[1] < losses[0]
    for k, v in deployed_4[0].items():
        assert torch.equal(v, deployed_4[1][k]), k
    assert cells.attack.summary([32, 4])["solver"] == "cells"


def test_statistics_term_is_zero_unquantized_and_pulls_fp32_towards_the_deployed_stats():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
    model.eval()
    x, y = torch.randn(8, 1, 6, 6), torch.zeros(8, dtype=torch.long)
    zero = lambda m, xb, yb: torch.zeros(())  # noqa: E731
    spec = QuantSpec("paper", "weights")
    assert float(matching_statistics(zero, spec, 32, 1.0)(model, x, y).detach()) == 0.0
    gap = matching_statistics(zero, spec, 2, 1.0)
    before = float(gap(model, x, y).detach())
    assert before > 0
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(20):  # STE: the deployed side moves too, but the gap must shrink
        opt.zero_grad()
        gap(model, x, y).backward()
        opt.step()
    assert float(gap(model, x, y).detach()) < 0.5 * before


def silent_phase_config(tiny, **overrides):
    """All 12 clients every round, clients 0 and 6 (one per edge) malicious, B = {8, 4}."""
    return tiny(
        **{
            "model.name": "mlp",
            "model.options": {},
            "quant.params": "weights",
            "quant.bits": [8, 4],
            "quant.eval_bits": [32],
            "topology.clients_per_edge": 6,
            "attack.kind": "fqbd",
            "trigger.size": 2,
            "attack.malicious_ids": [0, 6],
            "attack.candidate_bits": [8, 4, 3, 2],
            "attack.epochs": 1,
            **overrides,
        }
    )


def accuracy_by_hand(model, x, y) -> float:
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


@pytest.mark.parametrize("pool", [False, True])
def test_attackers_observe_every_global_model_of_the_silent_phase(tiny, digits, pool):
    silent = {"attack.start_round": 5, "attack.pool": pool}
    setup = prepare_arm(silent_phase_config(tiny, **{"train.rounds": 2, **silent}), digits)
    w0 = setup.layout.flatten(setup.model).clone()
    first_round = prepare_arm(silent_phase_config(tiny, **{"train.rounds": 1, **silent}), digits)
    w1 = run_rounds(first_round, lambda r: None)
    run_rounds(setup, lambda r: None)
    a = setup.attack
    assert a.active_updates == 0  # silent throughout ...
    # ... yet every received global model was observed: per client on its own data, or once
    # per model on the pooled data
    if pool:
        views = [torch.cat([setup.client_data(c)[i] for c in (0, 6)]) for i in (0, 1)]
        data = [tuple(views)]
    else:
        data = [setup.client_data(c) for c in (0, 6)]
    assert a.seen == 2 * len(data)
    model = copy.deepcopy(setup.model)
    for b in a.candidate_bits:  # ΔAcc_b = Acc(Q_b(w)) − Acc(w), summed over what was seen
        expected = 0.0
        for w in (w0, w1):
            setup.layout.load(model, w)
            q = quantize_copy(model, a.spec, b)
            expected += sum(
                accuracy_by_hand(q, x, y) - accuracy_by_hand(model, x, y) for x, y in data
            )
        assert a.drop_sum[b] == pytest.approx(expected, abs=1e-6)


def test_prediction_at_start_round_comes_from_the_silent_phase(tiny, digits):
    # QAT on B = {8, 4}: the global models of rounds 0–2 lose least at 8 and 4 bits; the first
    # malicious update (round 3) attacks the bits predicted from them
    cfg = silent_phase_config(
        tiny, **{"quant.qat": True, "train.rounds": 4, "attack.start_round": 3}
    )
    setup = prepare_arm(cfg, digits)
    a = setup.attack
    used = []
    objective = a.loss

    def spy(bits, client):
        used.append((list(bits), a.seen, a.predicted_bits()))
        return objective(bits, client)

    a.loss = spy
    run_rounds(setup, lambda r: None)
    assert [list(c) for c in setup.topology.edge_clients] == [list(range(6)), list(range(6, 12))]
    assert a.active_updates == 2 and len(used) == 2
    first_bits, seen_then, predicted_then = used[0]
    assert seen_then == 3 * 2 + 1  # 3 silent rounds × 2 attackers, then client 0's own view
    assert first_bits == predicted_then == setup.target_bits == [8, 4]


def test_attackers_trained_beside_the_honest_workers_equal_the_sequential_run(tmp_path):
    """With the process executor, the malicious clients train in this process while the
    workers train the honest ones (ProcessExecutor.submit): the run's numbers equal those of
    the sequential executor."""
    from fedtier.experiment import run_experiment
    from tests.conftest import tiny_config

    def run(executor):
        cfg = tiny_config(
            **{
                "train.rounds": 2,
                "train.executor": executor,
                "attack.kind": "fqbd",
                "attack.malicious_ids": [0, 1, 6, 7],
                "attack.start_round": 1,
                "attack.epochs": 1,
                "trigger.size": 2,
            }
        )
        summary = run_experiment(cfg, tmp_path / executor, progress=False)["arms"]["main"]
        summary.pop("wall_s")
        return summary

    sequential = run("sequential")
    assert sequential["attack"]["malicious_updates"] > 0
    assert run("processes") == sequential
