"""The bucketed codecs as upload stages: the bucket option reaches both the encoder and the
decoder (payload sizes in closed form, decoded values on each bucket's own grid), a single
bucket decodes right, and TernGrad stays unbiased at small magnitudes."""

import math

import numpy as np
import pytest
import torch

from fedtier.upload import UploadContext, codecs
from fedtier.upload.compress import qsgd, quantize, terngrad

D = 300


def _ctx():
    return UploadContext(round=2, edge=0, clients=[4], num_samples=torch.ones(1), seed=1)


def _x(scale=1.0, d=D):
    g = torch.Generator().manual_seed(7)
    return (torch.randn(d, generator=g) * torch.linspace(0.1, 3.0, d) + 0.2) * scale


def _buckets(v: np.ndarray, bucket: int) -> list[np.ndarray]:
    return [v[i : i + bucket] for i in range(0, len(v), bucket)]


@pytest.mark.parametrize("bucket", [64, 300, 1000])
def test_quantize_stage_uses_its_bucket(bucket):
    levels = 8
    x = _x()
    ctx = _ctx()
    out, m = quantize(levels=levels, bucket=bucket)(x[None], ctx)
    nb = math.ceil(D / bucket)
    assert m["bytes"] == ctx.payload_bytes[4] == 4 + 8 * nb + math.ceil(D * 3 / 8)
    for xb, ob in zip(_buckets(x.numpy(), bucket), _buckets(out[0].numpy(), bucket)):
        lo, hi = xb.min(), xb.max()
        k = (ob - lo) / ((hi - lo) / (levels - 1))
        np.testing.assert_allclose(k, np.round(k), atol=1e-3)  # on this bucket's grid
        assert (np.abs(ob - xb) <= (hi - lo) / (levels - 1) * (1 + 1e-4)).all()


@pytest.mark.parametrize("bucket", [64, 300, 1000])
def test_qsgd_stage_uses_its_bucket(bucket):
    levels = 4
    x = _x()
    ctx = _ctx()
    out, m = qsgd(levels=levels, bucket=bucket)(x[None], ctx)
    nb = math.ceil(D / bucket)
    assert m["bytes"] == 4 * nb + math.ceil(D * (1 + 3) / 8)  # sign + ⌈log2 5⌉ bits
    for xb, ob in zip(_buckets(x.numpy(), bucket), _buckets(out[0].numpy(), bucket)):
        unit = np.linalg.norm(xb) / levels
        k = ob / unit
        np.testing.assert_allclose(k, np.round(k), atol=1e-3)  # ‖x_b‖·ℓ/s, ℓ ∈ 0..s
        assert (np.abs(np.round(k)) <= levels).all()
        assert (np.sign(ob[ob != 0]) == np.sign(xb[ob != 0])).all()


@pytest.mark.parametrize("bucket", [64, 300, 1000])
def test_terngrad_stage_uses_its_bucket(bucket):
    x = _x()
    ctx = _ctx()
    out, m = terngrad(bucket=bucket)(x[None], ctx)
    nb = math.ceil(D / bucket)
    assert m["bytes"] == 4 * nb + math.ceil(D * 2 / 8)
    for xb, ob in zip(_buckets(x.numpy(), bucket), _buckets(out[0].numpy(), bucket)):
        s = np.abs(xb).max()
        assert set(np.unique(np.abs(ob)).tolist()) <= {0.0, float(np.float32(s))}
        assert (np.sign(ob[ob != 0]) == np.sign(xb[ob != 0])).all()


def test_terngrad_is_unbiased_at_small_magnitudes_in_one_bucket():
    x = _x(scale=0.01, d=50)  # max |x| well below 1, one bucket
    s = torch.stack(
        [
            codecs.decode_terngrad(codecs.encode_terngrad(x, torch.Generator().manual_seed(i)), 50)
            for i in range(2000)
        ]
    )
    scale = float(x.abs().max())
    assert ((s.abs() == 0) | ((s.abs() - scale).abs() < 1e-7)).all()
    assert ((s.mean(0) - x).abs() <= 5 * scale / 2 / math.sqrt(2000)).all()
    assert float(s.abs().sum()) > 0


@pytest.mark.parametrize("bucket", [64, 1000])
def test_dynamic_stage_uses_its_bucket(bucket):
    from fedtier.upload.compress import dynamic

    x = _x()
    ctx = _ctx()
    out, m = dynamic(target_error=0.01, bucket=bucket)(x[None], ctx)
    bits = int(m["bits_sum"])
    levels = 2**bits
    nb = math.ceil(D / bucket)
    assert m["bytes"] == 4 + 8 * nb + math.ceil(D * bits / 8)
    for xb, ob in zip(_buckets(x.numpy(), bucket), _buckets(out[0].numpy(), bucket)):
        lo, hi = xb.min(), xb.max()
        k = (ob - lo) / ((hi - lo) / (levels - 1))
        np.testing.assert_allclose(k, np.round(k), atol=1e-3)
