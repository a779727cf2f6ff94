import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from fedtier.config import from_dict
from fedtier.errors import ConfigError
from fedtier.upload import UploadContext, build_chain, codecs
from fedtier.upload.compress import choose_bits, codec_generator, dynamic, topk

D = 700  # not a multiple of the bucket: exercises the padded last bucket


def _x(seed=0, d=D):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, generator=g) * torch.linspace(0.1, 2.0, d) + 0.3


def _samples(encode, decode, x, n=2000):
    return torch.stack(
        [decode(encode(x, torch.Generator().manual_seed(i)), x.numel()) for i in range(n)]
    )


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 7, 8, 11, 16])
def test_pack_unpack_round_trip_and_size(bits):
    v = np.random.default_rng(bits).integers(0, 2**bits, size=333)
    payload = codecs.pack_bits(v, bits)
    assert len(payload) == codecs.packed_size(333, bits)
    np.testing.assert_array_equal(codecs.unpack_bits(payload, 333, bits), v)


def test_fp32_is_exact_and_four_bytes_per_value():
    x = _x()
    payload = codecs.encode_fp32(x)
    assert len(payload) == 4 * D
    assert torch.equal(codecs.decode_fp32(payload, D), x)


@pytest.mark.parametrize("levels", [2, 5, 16, 256])
def test_uniform_is_unbiased_within_the_variance_bound_and_on_the_grid(levels):
    x = _x()
    bucket = 256
    enc = lambda v, g: codecs.encode_uniform(v, levels, g, bucket)  # noqa: E731
    dec = lambda p, d: codecs.decode_uniform(p, d, bucket)  # noqa: E731
    s = _samples(enc, dec, x)
    spacing = codecs.uniform_spacing(x, levels, bucket)
    per_coord = spacing.repeat_interleave(bucket)[:D]
    # unbiased: the sample mean is within 5 standard errors (σ ≤ Δ/2) of x everywhere
    assert ((s.mean(0) - x).abs() <= 5 * per_coord / 2 / math.sqrt(len(s)) + 1e-6).all()
    # SPEC §5: E‖x − x̂‖² ≤ Σ d_b Δ_b²/4 ≤ d·Δ_max²/4
    mse = float(((s - x) ** 2).sum(1).mean())
    bound = codecs.uniform_error_bound(x, levels, bucket)
    assert mse <= bound * 1.02
    assert bound <= D * float(spacing.max()) ** 2 / 4
    # every decoded value is one of the two levels around x
    assert ((s - x).abs() <= per_coord * (1 + 1e-4) + 1e-6).all()


def test_uniform_payload_is_header_plus_packed_indices():
    x = _x()
    for levels in (2, 4, 16, 256, 1000):
        payload = codecs.encode_uniform(x, levels, torch.Generator().manual_seed(0), 128)
        nb = math.ceil(D / 128)
        assert len(payload) == 4 + 8 * nb + codecs.packed_size(D, codecs.bits_for(levels))


def test_uniform_constant_vector_is_exact():
    x = torch.full((100,), 0.25)
    p = codecs.encode_uniform(x, 4, torch.Generator().manual_seed(0))
    assert torch.equal(codecs.decode_uniform(p, 100), x)


@pytest.mark.parametrize("levels", [1, 4, 16])
def test_qsgd_unbiased_and_within_its_variance_bound(levels):
    x = _x()
    bucket = 128
    s = _samples(
        lambda v, g: codecs.encode_qsgd(v, levels, g, bucket),
        lambda p, d: codecs.decode_qsgd(p, d, levels, bucket),
        x,
    )
    norms = torch.stack([b.norm() for b in x.split(bucket)])
    sigma = norms.repeat_interleave(bucket)[:D] / levels / 2
    assert ((s.mean(0) - x).abs() <= 5 * sigma / math.sqrt(len(s)) + 1e-6).all()
    # Alistarh et al. Lemma 3.1, per bucket: E‖Q(x) − x‖² ≤ min(d/s², √d/s)·‖x‖²
    mse = ((s - x) ** 2).mean(0)
    for b, chunk in enumerate(x.split(bucket)):
        d = chunk.numel()
        got = float(mse[b * bucket : b * bucket + d].sum())
        assert got <= min(d / levels**2, math.sqrt(d) / levels) * float(chunk.norm()) ** 2 * 1.05
    assert len(codecs.encode_qsgd(x, levels, torch.Generator(), bucket)) == 4 * math.ceil(
        D / bucket
    ) + codecs.packed_size(D, 1 + codecs.bits_for(levels + 1))


def test_terngrad_unbiased_ternary_two_bits():
    x = _x()
    s = _samples(
        lambda v, g: codecs.encode_terngrad(v, g, 256),
        lambda p, d: codecs.decode_terngrad(p, d, 256),
        x,
    )
    scale = torch.stack([b.abs().max() for b in x.split(256)]).repeat_interleave(256)[:D]
    assert ((s.mean(0) - x).abs() <= 5 * scale / 2 / math.sqrt(len(s)) + 1e-6).all()
    one = s[0]
    assert set(torch.unique((one / scale).round()).tolist()) <= {-1.0, 0.0, 1.0}
    assert len(codecs.encode_terngrad(x, torch.Generator(), 256)) == 4 * 3 + math.ceil(D * 2 / 8)


def test_sign_and_topk_decode_what_they_should():
    x = _x()
    p = codecs.encode_sign(x)
    assert len(p) == 4 + math.ceil(D / 8)
    torch.testing.assert_close(codecs.decode_sign(p, D), x.abs().mean() * torch.sign(x))
    p = codecs.encode_topk(x, 50)
    assert len(p) == 8 * 50
    out = codecs.decode_topk(p, D)
    kept = x.abs().topk(50).indices
    assert torch.equal(out[kept], x[kept]) and int((out != 0).sum()) == 50


def _ctx(clients, round_=0):
    n = len(clients)
    return UploadContext(round=round_, edge=0, clients=clients, num_samples=torch.ones(n), seed=3)


def _stages(*specs):
    return from_dict({"upload": list(specs)}).upload


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "fp32"},
        {"name": "quantize", "levels": 16},
        {"name": "dynamic"},
        {"name": "qsgd", "levels": 8},
        {"name": "terngrad"},
        {"name": "signsgd"},
        {"name": "topk", "ratio": 0.1},
    ],
)
def test_every_codec_stage_counts_the_bytes_it_sent_and_is_per_client_deterministic(spec):
    deltas = torch.stack([_x(i) for i in range(3)])
    ctx = _ctx([4, 7, 9])
    out, m = build_chain(_stages(spec))(deltas, ctx)
    name = spec["name"]
    assert m[f"{name}/bytes"] == sum(ctx.payload_bytes.values()) > 0
    assert set(ctx.payload_bytes) == {4, 7, 9}
    assert m[f"{name}/fp32_bytes"] == 4 * deltas.numel()
    if name != "fp32":
        assert m[f"{name}/bytes"] < m[f"{name}/fp32_bytes"]
    # client 7 gets the same result alone as in company (randomness per (seed, round, client))
    alone, _ = build_chain(_stages(spec))(deltas[1:2], _ctx([7]))
    assert torch.equal(alone[0], out[1])


def test_error_feedback_carries_the_residual():
    stage = topk(ratio=0.05)
    xs = [_x(i).unsqueeze(0) for i in range(4)]
    sent = torch.zeros(D)
    state: dict = {}  # the run's state of this stage (a RunState entry in a run)
    for t, x in enumerate(xs):
        out, m = stage(x, replace(_ctx([5], t), state=state))
        sent += out[0]
    assert set(state["residual"]) == {5}
    # telescoping: Σ sent + e_T = Σ Δ_t, so the residual is exactly what has not been sent yet
    residual = sum(xs)[0] - sent
    assert m["residual_norm"] == pytest.approx(float(residual.norm()), rel=1e-5)
    # and it is re-sent: a client with zero new delta still uploads its residual's top entries
    out, _ = stage(torch.zeros(1, D), replace(_ctx([5], 9), state=state))
    assert float(out.abs().sum()) > 0
    # the residual is the run's state, not the stage's: a fresh state carries nothing
    out, _ = stage(torch.zeros(1, D), _ctx([5], 9))
    assert float(out.abs().sum()) == 0
    # without error feedback nothing is carried
    out, _ = topk(ratio=0.05, error_feedback=False)(torch.zeros(1, D), _ctx([5], 9))
    assert float(out.abs().sum()) == 0


def test_dynamic_bits_follow_error_target_and_resources():
    x = _x()
    loose, tight = choose_bits(x, 0.1, 2, 8), choose_bits(x, 0.001, 2, 8)
    assert 2 <= loose < tight <= 8
    assert codecs.uniform_error_bound(x, 2**tight) <= 0.001 * float(x.pow(2).sum())
    assert codecs.uniform_error_bound(x, 2 ** (tight - 1)) > 0.001 * float(x.pow(2).sum())
    # a device that can afford only 3 bits per value sends 3
    header = 32 + 64 * math.ceil(D / codecs.BUCKET)
    assert choose_bits(x, 0.001, 2, 8, budget_bits=header + 3 * D + 5) == 3
    assert choose_bits(x, 0.001, 2, 8, budget_bits=0) == 2  # never below min_bits

    class Radio:
        def payload_budget_bits(self, clients, d):
            return [header + 3 * d, 1e12]

    deltas = torch.stack([x, x])
    ctx = UploadContext(0, 0, [0, 1], torch.ones(2), 0, radio=Radio())
    _, m = dynamic(target_error=0.001)(deltas, ctx)
    assert m["bits_sum"] == 3 + tight
    assert ctx.payload_bytes[0] < ctx.payload_bytes[1]


def test_codec_randomness_is_seeded_per_round_and_client():
    a = torch.rand(5, generator=codec_generator(0, 1, 2))
    assert torch.equal(a, torch.rand(5, generator=codec_generator(0, 1, 2)))
    assert not torch.equal(a, torch.rand(5, generator=codec_generator(0, 1, 3)))


@pytest.mark.parametrize(
    "spec,field",
    [
        ({"name": "quantize", "levels": 1}, "upload[0].levels"),
        ({"name": "topk", "ratio": 0}, "upload[0].ratio"),
        ({"name": "dynamic", "target_error": -1}, "upload[0].target_error"),
        ({"name": "dynamic", "min_bits": 6, "max_bits": 4}, "upload[0].max_bits"),
        ({"name": "qsgd", "levels": "x"}, "upload[0].levels"),
    ],
)
def test_bad_codec_options_name_the_field(spec, field):
    with pytest.raises(ConfigError) as e:
        _stages(spec)
    assert e.value.field == field
