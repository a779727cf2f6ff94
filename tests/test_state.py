import torch
from torch import nn

from fedtier.state import StateLayout, keep_batchnorm_local


def _net():
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_flatten_load_round_trip_and_skips_integer_buffers():
    a, b = _net(), _net()
    layout = StateLayout.of(a)
    assert "1.num_batches_tracked" not in layout.names
    assert layout.size == 3 * 4 + 4 + 4 * 4 + 4 * 2 + 2  # params + BN running mean/var
    layout.load(b, layout.flatten(a))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])


def test_fedbn_filter_keeps_batchnorm_on_device():
    layout = StateLayout.of(_net(), keep_batchnorm_local)
    kept = [n for n, u in zip(layout.names, layout.uploaded) if not u]
    assert kept == ["1.weight", "1.bias", "1.running_mean", "1.running_var"]
    assert int((~layout.mask()).sum()) == 16
