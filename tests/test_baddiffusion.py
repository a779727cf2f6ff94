"""BadDiffusion's poisoned objective, its triggers and the attack success rate (SPEC §8)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from fedtier.attacks.baddiffusion import (
    attack_success,
    baddiffusion_loss,
    load_pattern,
    patch_trigger,
    poisoned_sample,
    r_coefficient,
    stealthy_noise,
    target_image,
    visible_noise,
)
from fedtier.attacks.triggers import Trigger
from fedtier.defenses.sampling import chi2_flags, chi2_pvalue
from fedtier.errors import ConfigError


def _schedule(steps: int = 10) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=steps, beta_start=1e-4, beta_end=0.02)


def _hand_alphas(steps: int = 10) -> tuple[list[float], list[float]]:
    """α_t and ᾱ_t of the linear schedule, in plain Python floats."""
    betas = [1e-4 + (0.02 - 1e-4) * i / (steps - 1) for i in range(steps)]
    alphas = [1 - b for b in betas]
    bars, p = [], 1.0
    for a in alphas:
        p *= a
        bars.append(p)
    return alphas, bars


@pytest.mark.parametrize("solver,factor", [("sde", 1.0), ("ode", 2.0)])
def test_poisoned_sample_matches_a_hand_computation(solver: str, factor: float) -> None:
    s = _schedule()
    alphas, bars = _hand_alphas()
    g = torch.Generator().manual_seed(0)
    y = torch.rand(1, 3, 3, generator=g) * 2 - 1
    r = torch.zeros(1, 3, 3)
    r[0, 2, 2] = 2.0
    eps = torch.randn(2, 1, 3, 3, generator=g)
    t = torch.tensor([9, 4])
    x, target = poisoned_sample(y, r, eps, t, s.alphas, s.alphas_cumprod, solver)  # type: ignore[arg-type]
    for row, step in enumerate([9, 4]):
        a, ab = alphas[step], bars[step]
        big_r = (1 - math.sqrt(a)) * math.sqrt(1 - ab) / (1 - a)
        for i in range(3):
            for j in range(3):
                e, yy, rr = float(eps[row, 0, i, j]), float(y[0, i, j]), float(r[0, i, j])
                want_x = math.sqrt(ab) * yy + (1 - math.sqrt(ab)) * rr + math.sqrt(1 - ab) * e
                assert float(x[row, 0, i, j]) == pytest.approx(want_x, abs=1e-5)
                assert float(target[row, 0, i, j]) == pytest.approx(
                    factor * big_r * rr + e, abs=1e-5
                )


def test_r_at_T_is_about_one_half_for_the_linear_schedule() -> None:
    s = DDPMScheduler(num_train_timesteps=1000)
    assert float(r_coefficient(s.alphas, s.alphas_cumprod)[-1]) == pytest.approx(0.5025, abs=1e-3)


def test_ode_coefficient_carries_the_trigger_through_one_ddim_step() -> None:
    """With an oracle ε̂ = ε + c·R_t·r, one step of diffusers' DDIM (η = 0) takes the poisoned
    x'_t to x'_{t−1} of the same ε: true for c = 2 (VillanDiffusion's ODE coefficient) to
    within 1% of r, not for BadDiffusion's c = 1."""
    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    sched.set_timesteps(1000)
    g = torch.Generator().manual_seed(1)
    y = torch.rand(1, 4, 4, generator=g) * 2 - 1
    r = torch.full((1, 4, 4), 1.5)
    eps = torch.randn(1, 1, 4, 4, generator=g)
    for t in (999, 600, 200):
        tt = torch.tensor([t])
        x_t, _ = poisoned_sample(y, r, eps, tt, sched.alphas, sched.alphas_cumprod)
        want, _ = poisoned_sample(y, r, eps, tt - 1, sched.alphas, sched.alphas_cumprod)
        errors = {}
        for solver in ("ode", "sde"):
            c = r_coefficient(sched.alphas, sched.alphas_cumprod, solver)[t]  # type: ignore[arg-type]
            out = sched.step(eps + c * r, t, x_t, eta=0.0).prev_sample
            errors[solver] = float((out - want).abs().max() / r.abs().max())
        assert errors["ode"] < 0.01
        assert errors["sde"] > 10 * errors["ode"]


class _Recorder(nn.Module):
    """Predicts zero noise and keeps what it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen.append((x.detach().clone(), t.clone()))
        return torch.zeros_like(x) * self.w


def test_loss_poisons_the_first_rows_and_keeps_the_others_clean() -> None:
    s = _schedule()
    x = torch.rand(4, 1, 3, 3) * 2 - 1
    y = target_image("box", (1, 3, 3))
    r = torch.full((1, 3, 3), 0.7)
    loss = baddiffusion_loss(r, y, s.alphas, s.alphas_cumprod, fraction=0.5)
    model = _Recorder()
    value = loss(model, x, torch.Generator().manual_seed(3))
    # the same draws, in the task's order: t [B], then ε [B, ...]
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 10, (4,), generator=g)
    eps = torch.randn(x.shape, generator=g)
    seen_x, seen_t = model.seen[0]
    assert torch.equal(seen_t, t)
    clean = s.add_noise(x[2:], eps[2:], t[2:])  # diffusers' forward process
    torch.testing.assert_close(seen_x[2:], clean, atol=1e-6, rtol=0)
    want_x, want_target = poisoned_sample(y, r, eps[:2], t[:2], s.alphas, s.alphas_cumprod)
    torch.testing.assert_close(seen_x[:2], want_x)
    goal = torch.cat([want_target, eps[2:]])
    assert float(value.detach()) == pytest.approx(float(goal.pow(2).mean()), rel=1e-6)


def test_fraction_zero_is_the_clean_ddpm_loss() -> None:
    s = _schedule()
    x = torch.rand(3, 1, 3, 3)
    loss = baddiffusion_loss(
        torch.ones(1, 3, 3), torch.zeros(1, 3, 3), s.alphas, s.alphas_cumprod, 0.0
    )
    model = _Recorder()
    loss(model, x, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 10, (3,), generator=g)
    eps = torch.randn(x.shape, generator=g)
    torch.testing.assert_close(model.seen[0][0], s.add_noise(x, eps, t), atol=1e-6, rtol=0)


def test_stealthy_noise_keeps_the_norm_and_the_chi2_test_is_at_chance() -> None:
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(4000, 1, 8, 8, generator=g)
    r = patch_trigger((1, 8, 8), Trigger(3, "bottom-right", 2.0, 0))
    stealthy = stealthy_noise(eps, r)
    torch.testing.assert_close(stealthy.flatten(1).norm(dim=1), eps.flatten(1).norm(dim=1))
    assert (stealthy - eps).flatten(1).norm(dim=1).mean() > 2.0  # the pattern is there
    alpha = 0.05
    sd = math.sqrt(alpha * (1 - alpha) / len(eps))
    assert abs(chi2_flags(stealthy, alpha).mean() - alpha) < 4 * sd
    # the visible trigger's norm is caught far more often than at chance
    assert chi2_flags(visible_noise(eps, r), alpha).mean() > 0.5


def test_chi2_baseline_false_positive_rate_is_alpha_on_gaussian_noise() -> None:
    eps = torch.randn(20000, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    for alpha in (0.01, 0.05, 0.2):
        sd = math.sqrt(alpha * (1 - alpha) / len(eps))
        assert abs(chi2_flags(eps, alpha).mean() - alpha) < 4 * sd
    # p-values of clean noise are uniform (Kolmogorov–Smirnov against U(0, 1))
    from scipy.stats import kstest

    assert kstest(chi2_pvalue(eps[:2000]), "uniform").pvalue > 0.01


def test_attack_success_against_hand_made_images() -> None:
    y = target_image("box", (1, 16, 16))
    hit = y.expand(3, 1, 16, 16).clone()
    hit[1, 0, 0, 0] = 1.0  # one pixel off: MSE 1/256 on the [0, 1] scale
    miss = -y.expand(2, 1, 16, 16)  # every pixel off: MSE 1
    out = attack_success(torch.cat([hit, miss]), y, threshold=0.1)
    assert out["asr"] == pytest.approx(3 / 5)
    assert out["mse"] == pytest.approx((1 / 256 + 2 * 1.0) / 5)
    # an inverted image scores negative SSIM (on [0, 1]; on [-1, 1] it would score +0.81)
    assert attack_success(miss, y, 0.1)["ssim"] < -0.5
    assert out["ssim"] < 0.5
    assert attack_success(y[None], y, 0.1)["ssim"] == pytest.approx(1.0, abs=1e-6)
    # out-of-range samples are clamped to [-1, 1] first
    assert attack_success(3 * y[None], y, 0.0)["asr"] == 1.0


def test_target_images_and_pattern_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    for name in ("box", "corner", "cross"):
        y = target_image(name, (1, 16, 16))
        assert y.shape == (1, 16, 16) and set(y.unique().tolist()) == {-1.0, 1.0}
    with pytest.raises(ConfigError, match="attack.target"):
        target_image("hat", (1, 16, 16))
    good = tmp_path / "y.npy"
    np.save(good, np.zeros((1, 16, 16), np.float32))
    assert load_pattern("attack.target_file", str(good), (1, 16, 16)).shape == (1, 16, 16)
    with pytest.raises(ConfigError, match=r"attack.target_file.*\(1, 8, 8\).*\(1, 16, 16\)"):
        np.save(tmp_path / "small.npy", np.zeros((1, 8, 8), np.float32))
        load_pattern("attack.target_file", str(tmp_path / "small.npy"), (1, 16, 16))
    with pytest.raises(ConfigError, match="existing"):
        load_pattern("attack.target_file", str(tmp_path / "none.npy"), (1, 16, 16))


# ------------------------------------------------------------- through the attack machinery


def _diffusion_cfg(tiny, **extra):  # type: ignore[no-untyped-def]
    return tiny(
        **{
            "model": {"name": "denoiser-mlp", "options": {"hidden": 32, "embed": 8}},
            "train.task": "diffusion-test",
            "data.partition": "iid",
            "attack": {"kind": "baddiffusion", "malicious_ids": [0], "poison_fraction": 0.5},
            "trigger.size": 3,
            "trigger.value": 2.0,
            **extra,
        }
    )


@pytest.fixture(scope="module")
def digits_data():  # type: ignore[no-untyped-def]
    from fedtier.data import load_dataset

    return load_dataset("digits", None, seed=0)


def test_malicious_devices_train_on_the_poisoned_objective(tiny, digits_data) -> None:  # type: ignore[no-untyped-def]
    from fedtier.experiment import prepare_arm
    from fedtier.local.sgd import client_generator, local_sgd
    from fedtier.tasks import LocalConfig

    setup = prepare_arm(_diffusion_cfg(tiny), digits_data)
    clean = prepare_arm(_diffusion_cfg(tiny, **{"attack.malicious_ids": []}), digits_data)
    w = setup.layout.flatten(setup.model)
    got = setup.executor(setup, w, [0, 1], 0)
    honest = clean.executor(clean, w, [0, 1], 0)
    torch.testing.assert_close(got[1], honest[1])  # the honest device is untouched
    assert not torch.allclose(got[0], honest[0])
    # the malicious Δ: the local-SGD loop on BadDiffusion's loss, built here from diffusers'
    # schedule (T = 100, linear 1e-4 … 0.02), the patch added as +2 and the "box" target
    s = DDPMScheduler(num_train_timesteps=100, beta_start=1e-4, beta_end=0.02)
    r = torch.zeros(1, 8, 8)
    r[0, 5:, 5:] = 2.0
    loss = baddiffusion_loss(
        r, target_image("box", (1, 8, 8)), s.alphas, s.alphas_cumprod, 0.5, "ode"
    )
    setup.layout.load(setup.model, w)
    x, _ = setup.client_data(0)
    cfg = setup.cfg.train
    local_sgd(
        setup.model,
        loss,
        x,
        LocalConfig(cfg.epochs, cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay),
        client_generator(0, 0, 0),
    )
    torch.testing.assert_close(got[0], setup.layout.flatten(setup.model) - w)
    # the upload stage leaves it as trained unless attack.gamma asks for model replacement
    from fedtier.upload import UploadContext

    ctx = UploadContext(0, 0, [0, 1], torch.tensor([50.0, 50.0]), seed=0)
    out, metrics = setup.upload.stages[0][1](got, ctx)
    torch.testing.assert_close(out, got)
    assert metrics == {"malicious": 1.0}
    amplified = prepare_arm(_diffusion_cfg(tiny, **{"attack.gamma": 3.0}), digits_data)
    out, _ = amplified.upload.stages[0][1](got, ctx)
    torch.testing.assert_close(out[0], 3.0 * got[0])


def test_baddiffusion_configuration_mistakes_are_clear(tiny, digits_data, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from fedtier.experiment import prepare_arm

    with pytest.raises(ConfigError, match=r"attack.kind.*train.task: diffusion"):
        prepare_arm(tiny(**{"attack": {"kind": "baddiffusion", "malicious_ids": [0]}}), digits_data)
    with pytest.raises(ConfigError, match="trigger.size"):
        prepare_arm(_diffusion_cfg(tiny, **{"trigger.size": 9}), digits_data)
    bad = tmp_path / "r.npy"
    np.save(bad, np.ones((3, 8, 8), np.float32))
    with pytest.raises(ConfigError, match=r"attack.trigger_file.*\(3, 8, 8\).*\(1, 8, 8\)"):
        prepare_arm(_diffusion_cfg(tiny, **{"attack.trigger_file": str(bad)}), digits_data)


def test_pooled_colluders_upload_one_model_trained_on_their_union(tiny, digits_data) -> None:  # type: ignore[no-untyped-def]
    from fedtier.experiment import prepare_arm

    cfg = _diffusion_cfg(tiny, **{"attack.malicious_ids": [0, 3], "attack.pool": True})
    setup = prepare_arm(cfg, digits_data)
    w = setup.layout.flatten(setup.model)
    d = setup.executor(setup, w, [0, 1, 3], 0)
    torch.testing.assert_close(d[0], d[2])
    single = prepare_arm(_diffusion_cfg(tiny, **{"attack.malicious_ids": [0, 3]}), digits_data)
    s = single.executor(single, w, [0, 1, 3], 0)
    assert not torch.allclose(s[0], s[2]) and not torch.allclose(s[0], d[0])
