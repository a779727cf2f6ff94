"""DDIM sampling (diffusers) against a hand-written DDIM, and collaborative sampling
(edge t steps, then device S − t) against device-only sampling."""

import pytest
import torch

from fedtier.errors import FedtierError
from fedtier.models import build_model
from fedtier.tasks.diffusion import (
    DiffusionTask,
    collaborative_sample,
    ddim_scheduler,
    linear_alpha_bar,
    sample,
)

TASK = DiffusionTask(steps=100, sample_steps=5)


def _model():
    torch.manual_seed(0)
    m = build_model("unet", (1, 8, 8), 10, channels=[8, 16], layers_per_block=1)
    with torch.no_grad():  # small outputs keep the chain in a sane range
        for p in m.parameters():
            p.mul_(0.3)
    return m.eval()


def _ddim_by_hand(model, x, steps, clip=False):
    """DDIM with η = 0 (Song et al. 2021, eq. 12), timesteps T/S·(S−1), …, 0, ᾱ_{−1} = 1."""
    ab = linear_alpha_bar(TASK.steps, TASK.beta_start, TASK.beta_end).double()
    ts = [i * (TASK.steps // steps) for i in reversed(range(steps))]
    x = x.double()
    for i, t in enumerate(ts):
        eps = model(x.float(), torch.full((len(x),), t)).double()
        x0 = (x - (1 - ab[t]).sqrt() * eps) / ab[t].sqrt()
        if clip:  # only x̂_0 is clamped; the direction term keeps the predicted ε
            x0 = x0.clamp(-1, 1)
        prev = ab[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
        x = prev.sqrt() * x0 + (1 - prev).sqrt() * eps
    return x


def test_the_schedulers_schedule_is_the_tasks_closed_form():
    sched = ddim_scheduler(DiffusionTask(steps=1000))
    ref = linear_alpha_bar(1000, 1e-4, 0.02)
    torch.testing.assert_close(sched.alphas_cumprod, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("clip", [False, True])
def test_ddim_sampling_matches_a_hand_written_ddim(clip):
    model = _model()
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = sample(model, ddim_scheduler(TASK), x_T, 5, clip_x0=clip)
    ref = _ddim_by_hand(model, x_T, 5, clip=clip)
    torch.testing.assert_close(ours.double(), ref, atol=2e-4, rtol=1e-4)
    if clip:  # clamping x̂_0 changes the result on an untrained model
        assert not torch.allclose(ours, sample(model, ddim_scheduler(TASK), x_T, 5))


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("t", [0, 1, 3, 5])
def test_collaborative_sampling_equals_device_only_sampling_exactly(t, clip):
    model = _model()
    sched = ddim_scheduler(TASK)
    x_T = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    device_only = sample(model, sched, x_T, 5, clip_x0=clip)
    x0, middle = collaborative_sample(model, sched, x_T, 5, t, clip_x0=clip)
    assert torch.equal(x0, device_only)
    assert torch.equal(middle, sample(model, sched, x_T, 5, 0, t, clip_x0=clip))
    if clip:  # both parts clip: the hand-written DDIM with x̂_0 clamped at every step
        torch.testing.assert_close(
            x0.double(), _ddim_by_hand(model, x_T, 5, True), atol=2e-4, rtol=1e-4
        )
    if t == 0:
        assert torch.equal(middle, x_T)
    if t == 5:
        assert torch.equal(middle, device_only)


def test_shared_steps_beyond_the_sampling_steps_are_refused():
    model, sched, x = _model(), ddim_scheduler(TASK), torch.zeros(1, 1, 8, 8)
    with pytest.raises(FedtierError, match=r"t = 6 must be in 0\.\.5"):
        collaborative_sample(model, sched, x, 5, 6)
    with pytest.raises(FedtierError, match="outside the S = 5"):
        sample(model, sched, x, 5, 3, 2)
