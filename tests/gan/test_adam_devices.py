"""The stacked discriminators against plain torch: torch.optim.Adam per device, autograd by
``loss.backward()`` / ``torch.autograd.grad`` on one nn.Module per device (the hand-written
loop), for both executors (vectorised = vmap, sequential = one by one)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

from fedtier.errors import ConfigError
from fedtier.gan import DeviceDiscriminators, adam_init, adam_update
from fedtier.gan.devices import check_discriminator
from fedtier.models import build_model

SHAPE = (1, 8, 8)


def test_stacked_adam_equals_torch_adam_per_row() -> None:
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(3, 4, 5, generator=gen), "b": torch.randn(3, 5, generator=gen)}
    refs = [{k: v[r].clone().requires_grad_(True) for k, v in params.items()} for r in range(3)]
    opts = [torch.optim.Adam(list(p.values()), lr=0.01, betas=(0.5, 0.99)) for p in refs]
    state = adam_init(params)
    for _ in range(6):
        grads = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
        adam_update(params, grads, state, 0.01, (0.5, 0.99))
        for r, (p, opt) in enumerate(zip(refs, opts)):
            for k in p:
                p[k].grad = grads[k][r].clone()
            opt.step()
    for r, p in enumerate(refs):
        for k in p:
            torch.testing.assert_close(params[k][r], p[k].detach(), rtol=1e-6, atol=1e-7)
    assert state["step"]["count"].tolist() == [6.0, 6.0, 6.0]


def _models(n: int) -> list[torch.nn.Module]:
    out = []
    for i in range(n):
        torch.manual_seed(100 + i)
        out.append(build_model("dcgan-discriminator", SHAPE, 1, width=4))
    return out


@pytest.mark.parametrize("executor", ["vectorised", "sequential"])
@pytest.mark.parametrize("kind", ["non-saturating", "minimax"])
def test_discriminators_agree_with_a_plain_torch_loop(executor: str, kind: str) -> None:
    models = _models(4)
    refs = [copy.deepcopy(m) for m in models]
    opts = [torch.optim.Adam(m.parameters(), lr=2e-3, betas=(0.5, 0.999)) for m in refs]
    stack = DeviceDiscriminators.stack(models, 2e-3, (0.5, 0.999), executor)
    gen = torch.Generator().manual_seed(1)
    block = slice(1, 4)  # the last three devices (a region); device 0 must not move
    untouched = {k: v[0].clone() for k, v in stack.params.items()}
    for _ in range(3):
        real = torch.rand(3, 6, *SHAPE, generator=gen) * 2 - 1
        fake = torch.rand(3, 6, *SHAPE, generator=gen) * 2 - 1
        probe = torch.rand(3, 6, *SHAPE, generator=gen) * 2 - 1
        losses = stack.step(block, real, fake)
        feedback, fooling = stack.feedback(block, probe, kind)
        for r, (m, opt) in enumerate(zip(refs[1:], opts[1:])):
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(
                m(real[r]), torch.ones(6, 1)
            ) + F.binary_cross_entropy_with_logits(m(fake[r]), torch.zeros(6, 1))
            loss.backward()
            opt.step()
            torch.testing.assert_close(losses[r], loss.detach(), rtol=1e-5, atol=1e-6)
            x = probe[r].clone().requires_grad_(True)
            d = torch.sigmoid(m(x))
            gen_loss = -torch.log(d).mean() if kind == "non-saturating" else torch.log(1 - d).mean()
            (grad,) = torch.autograd.grad(gen_loss, x)
            torch.testing.assert_close(feedback[r], grad, rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(
                fooling[r], torch.log(1 - d).mean().detach(), rtol=1e-5, atol=1e-6
            )
    for r, m in enumerate(refs[1:]):
        for name, p in m.named_parameters():
            torch.testing.assert_close(stack.params[name][1 + r], p.detach(), rtol=1e-5, atol=1e-5)
    for k, v in untouched.items():
        assert torch.equal(stack.params[k][0], v)


def test_discriminator_with_batchnorm_is_refused() -> None:
    model = build_model("cnn-bn", SHAPE, 1)
    with pytest.raises(ConfigError, match="gan.discriminator.name.*BatchNorm"):
        check_discriminator(model, "cnn-bn")


@pytest.mark.parametrize("executor", ["vectorised", "sequential"])
def test_bf16_discriminators_agree_with_a_plain_autocast_loop(executor: str) -> None:
    """train.precision bf16: the devices' forward passes run under bf16 autocast (Adam fp32);
    the reference is torch.autocast around one nn.Module per device, two separate calls for
    the real and generated batches (fedtier passes them through one)."""
    models = _models(2)
    refs = [copy.deepcopy(m) for m in models]
    opts = [torch.optim.Adam(m.parameters(), lr=2e-3, betas=(0.5, 0.999)) for m in refs]
    stack = DeviceDiscriminators.stack(models, 2e-3, (0.5, 0.999), executor, "bf16")
    gen = torch.Generator().manual_seed(2)
    real, fake, probe = (torch.rand(3, 2, 6, *SHAPE, generator=gen) * 2 - 1 for _ in range(3))
    for t in range(3):
        losses = stack.step(slice(0, 2), real[t], fake[t])
        feedback, _ = stack.feedback(slice(0, 2), probe[t], "non-saturating")
        for r, (m, opt) in enumerate(zip(refs, opts)):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                lr, lf = m(real[t][r]).float(), m(fake[t][r]).float()
            loss = F.softplus(-lr).mean() + F.softplus(lf).mean()
            loss.backward()
            opt.step()
            torch.testing.assert_close(losses[r], loss.detach(), rtol=2e-2, atol=1e-3)
            x = probe[t][r].clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                lp = m(x).float()
            (grad,) = torch.autograd.grad(F.softplus(-lp).mean(), x)
            assert feedback[r].dtype == torch.float32
            torch.testing.assert_close(feedback[r], grad, rtol=5e-2, atol=2e-4)
    for r, m in enumerate(refs):
        for name, p in m.named_parameters():
            assert stack.params[name].dtype == torch.float32  # master weights stay fp32
            # Adam turns a bf16 rounding of a near-zero gradient into up to lr per step
            torch.testing.assert_close(stack.params[name][r], p.detach(), rtol=2e-2, atol=6e-3)
