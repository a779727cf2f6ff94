import math

import pytest
import torch
from opacus.accountants import RDPAccountant

from fedtier.aggregate.robust import build_rule
from fedtier.privacy import dp_epsilon, local_dp
from fedtier.upload import UploadContext


def test_central_dp_noise_has_the_calibrated_scale():
    clip, z, n, p = 2.0, 1.5, 10, 200_000
    rule = build_rule("dp-mean", {"clip": clip, "noise": z, "seed": 0}, "x")
    out, _ = rule(torch.zeros(n, p), torch.ones(n))
    assert out.std().item() == pytest.approx(z * clip / n, rel=0.01)
    assert abs(out.mean().item()) < 3 * z * clip / n / math.sqrt(p)


def test_central_dp_clips_every_row_and_sums_equally():
    rule = build_rule("dp-mean", {"clip": 1.0, "noise": 0.0}, "x")
    u = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    out, m = rule(u, torch.tensor([100.0, 1.0]))
    torch.testing.assert_close(out, (torch.tensor([0.6, 0.8]) + torch.tensor([0.3, 0.4])) / 2)
    assert m["clipped"] == 1.0


def test_central_dp_is_reproducible_and_fresh_each_call():
    a = build_rule("dp-mean", {"noise": 1.0, "seed": 3}, "x")
    b = build_rule("dp-mean", {"noise": 1.0, "seed": 3}, "x")
    u, w = torch.zeros(4, 10), torch.ones(4)
    first = a(u, w)[0]
    torch.testing.assert_close(first, b(u, w)[0])
    assert not torch.equal(first, a(u, w)[0])


def test_local_dp_noise_scale_and_per_client_determinism():
    clip, z, p = 0.5, 2.0, 100_000
    stage = local_dp(clip, z)
    ctx = UploadContext(round=3, edge=0, clients=[7, 9], num_samples=torch.ones(2), seed=0)
    out, _ = stage(torch.zeros(2, p), ctx)
    for row in out:
        assert row.std().item() == pytest.approx(z * clip, rel=0.01)
    # client 9's noise does not depend on who else uploads
    alone, _ = stage(torch.zeros(1, p), UploadContext(3, 0, [9], torch.ones(1), 0))
    torch.testing.assert_close(alone[0], out[1])


def test_epsilon_comes_from_opacus_and_behaves():
    acc = RDPAccountant()
    for _ in range(40):
        acc.step(noise_multiplier=1.1, sample_rate=0.2)
    assert dp_epsilon(1.1, 0.2, 40, 1e-5) == pytest.approx(acc.get_epsilon(1e-5))
    assert dp_epsilon(1.1, 0.2, 40, 1e-5) > dp_epsilon(1.1, 0.2, 20, 1e-5)
    assert dp_epsilon(2.0, 0.2, 40, 1e-5) < dp_epsilon(1.1, 0.2, 40, 1e-5)
    assert dp_epsilon(0.0, 0.2, 1, 1e-5) == math.inf
    assert dp_epsilon(1.0, 0.2, 0, 1e-5) == 0.0


def test_dp_options_are_checked(tiny):
    from fedtier.errors import ConfigError

    with pytest.raises(ConfigError, match=r"aggregate\.edge_rule\.clip"):
        tiny(**{"aggregate.edge_rule": {"name": "dp-mean", "clip": -1}})
    with pytest.raises(ConfigError, match=r"upload\[0\]\.noise"):
        tiny(upload=[{"name": "ldp", "noise": -1}])
