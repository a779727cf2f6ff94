"""The upload stages' Python API: factory defaults behave as the config's defaults, bad options
name the field, the value and what is allowed, and the options do what they say."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from fedtier.config import from_dict
from fedtier.errors import ConfigError
from fedtier.privacy import local_dp
from fedtier.upload import STAGES, UploadContext, build_chain, clip_norm, codecs
from fedtier.upload.compress import dynamic, qsgd, quantize, signsgd, terngrad, topk


def _ctx(clients, round_=0, state=None):
    n = len(clients)
    return UploadContext(
        round=round_, edge=0, clients=clients, num_samples=torch.ones(n), seed=5, state=state
    )


def _rows(seed, d=1500):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, d, generator=g) * torch.linspace(0.2, 3.0, d) + 0.1


def _run_twice(stage, x):
    """Two uploads of the same clients sharing the stage's state (error feedback)."""
    state: dict = {}
    out1, m1 = stage(x, _ctx([1, 2], 0, state))
    out2, m2 = stage(x, _ctx([1, 2], 1, state))
    return out1, out2, m1, m2


def _inputs():
    near_constant = 10 + 1e-3 * torch.randn(2, 1500, generator=torch.Generator().manual_seed(9))
    return [_rows(0), near_constant]


# partial options a user may give in Python; the rest comes from the factory's defaults
CASES = [
    ("fp32", {}),
    ("clip", {"max_norm": 30.0}),
    ("quantize", {}),
    ("quantize", {"levels": 4}),
    ("qsgd", {}),
    ("qsgd", {"levels": 2}),
    ("terngrad", {}),
    ("signsgd", {}),
    ("topk", {}),
    ("topk", {"ratio": 0.2}),
    ("dynamic", {}),
    ("dynamic", {"target_error": 1e-9}),
    ("dynamic", {"target_error": 0.5}),
    ("ldp", {}),
    ("ldp", {"noise": 0.0}),
]


@pytest.mark.parametrize("name, partial", CASES)
def test_factory_defaults_behave_as_the_config_defaults(name, partial):
    """``STAGES[name](**partial)`` (Python) uploads exactly what the config's stage with the
    same options uploads (``upload: [{name, **partial}]``, every other option at the config's
    default), on several inputs and over two uploads (error feedback state)."""
    spec = from_dict({"upload": [{"name": name, **partial}]}).upload[0]
    for x in _inputs():
        ours = _run_twice(STAGES[name](**partial), x)
        theirs = _run_twice(build_chain([spec]).stages[0][1], x)
        for a, b in zip(ours[:2], theirs[:2]):
            assert torch.equal(a, b), (name, partial)
        assert ours[2:] == theirs[2:]


@pytest.mark.parametrize(
    "factory, options, field, allowed",
    [
        (clip_norm, {"max_norm": 0.0}, "upload.clip.max_norm", "a positive number"),
        (clip_norm, {"max_norm": -1.0}, "upload.clip.max_norm", "a positive number"),
        (quantize, {"levels": 1}, "upload.quantize.levels", "an integer >= 2"),
        (quantize, {"levels": True}, "upload.quantize.levels", "an integer >= 2"),
        (quantize, {"bucket": 0}, "upload.quantize.bucket", "an integer >= 1"),
        (qsgd, {"levels": 0}, "upload.qsgd.levels", "an integer >= 1"),
        (qsgd, {"levels": 2.0}, "upload.qsgd.levels", "an integer >= 1"),
        (qsgd, {"bucket": -4}, "upload.qsgd.bucket", "an integer >= 1"),
        (terngrad, {"bucket": 0}, "upload.terngrad.bucket", "an integer >= 1"),
        (signsgd, {"error_feedback": 1}, "upload.signsgd.error_feedback", "true or false"),
        (signsgd, {"error_feedback": "yes"}, "upload.signsgd.error_feedback", "true or false"),
        (topk, {"ratio": 0}, "upload.topk.ratio", "a fraction in (0, 1]"),
        (topk, {"ratio": 1.5}, "upload.topk.ratio", "a fraction in (0, 1]"),
        (topk, {"ratio": True}, "upload.topk.ratio", "a fraction in (0, 1]"),
        (topk, {"ratio": "0.1"}, "upload.topk.ratio", "a fraction in (0, 1]"),
        (topk, {"error_feedback": "no"}, "upload.topk.error_feedback", "true or false"),
        (dynamic, {"target_error": 0}, "upload.dynamic.target_error", "a positive number"),
        (dynamic, {"target_error": -0.1}, "upload.dynamic.target_error", "a positive number"),
        (dynamic, {"target_error": True}, "upload.dynamic.target_error", "a positive number"),
        (dynamic, {"target_error": "0.1"}, "upload.dynamic.target_error", "a positive number"),
        (dynamic, {"min_bits": 0}, "upload.dynamic.min_bits", "an integer >= 1"),
        (dynamic, {"max_bits": 0}, "upload.dynamic.max_bits", "an integer >= 1"),
        (dynamic, {"min_bits": 5, "max_bits": 4}, "upload.dynamic.max_bits", "5..16 (>= min_bits)"),
        (dynamic, {"max_bits": 17}, "upload.dynamic.max_bits", "2..16 (>= min_bits)"),
        (dynamic, {"bucket": 0}, "upload.dynamic.bucket", "an integer >= 1"),
        (local_dp, {"clip": 0.0}, "upload.ldp.clip", "a positive number"),
        (local_dp, {"noise": -0.5}, "upload.ldp.noise", "a number >= 0 (z = σ / C)"),
    ],
)
def test_a_bad_option_names_the_field_the_value_and_what_is_allowed(
    factory, options, field, allowed
):
    with pytest.raises(ConfigError) as e:
        factory(**options)
    bad = options[field.rsplit(".", 1)[1]]
    assert (e.value.field, e.value.value, e.value.allowed) == (field, bad, allowed)
    assert f"'{field}'" in str(e.value) and repr(bad) in str(e.value)


@pytest.mark.parametrize(
    "factory, options", [(dynamic, {"max_bits": 16}), (quantize, {"levels": 2})]
)
def test_the_boundary_values_of_the_options_are_accepted(factory, options):
    factory(**options)
    clip_norm(1e-9)
    local_dp(clip=1e-9, noise=0.0)
    topk(ratio=1)
    dynamic(min_bits=1, max_bits=1)


@pytest.mark.parametrize("ratio, d", [(0.1, 700), (0.013, 700), (0.5, 3), (1.0, 40)])
def test_topk_sends_the_ceiling_of_ratio_times_p_entries(ratio, d):
    x = torch.randn(1, d, generator=torch.Generator().manual_seed(d))
    ctx = _ctx([3])
    out, m = topk(ratio=ratio, error_feedback=False)(x, ctx)
    k = math.ceil(ratio * d)
    assert int((out != 0).sum()) == k
    assert m["bytes"] == ctx.payload_bytes[3] == 8 * k
    top = np.argsort(-np.abs(x[0].numpy()))[:k]
    np.testing.assert_array_equal(out[0].numpy()[top], x[0].numpy()[top])


def test_encode_topk_clamps_k_to_between_one_and_p():
    x = torch.tensor([0.1, -3.0, 2.0, 0.5])
    assert torch.equal(
        codecs.decode_topk(codecs.encode_topk(x, 0), 4), torch.tensor([0, -3.0, 0, 0])
    )
    assert torch.equal(codecs.decode_topk(codecs.encode_topk(x, 99), 4), x)


@pytest.mark.parametrize("factory", [signsgd, topk])
def test_biased_codecs_carry_error_feedback_by_default(factory):
    x = _rows(1)
    on = _run_twice(factory(), x)
    off = _run_twice(factory(error_feedback=False), x)
    assert torch.equal(on[0], off[0])  # nothing to carry on the first upload
    # second upload: p = Δ + e with e = Δ − C(Δ) from the first (EF-SGD)
    expected = torch.stack([STAGES_DECODE[factory](2 * x[i] - on[0][i]) for i in range(2)])
    torch.testing.assert_close(on[1], expected)
    assert not torch.equal(on[1], off[1])
    assert "residual_norm" in on[3] and "residual_norm" not in off[3]


STAGES_DECODE = {
    signsgd: lambda p: p.abs().mean() * torch.where(p < 0, -1.0, 1.0),
    topk: lambda p: torch.where(
        torch.zeros_like(p, dtype=torch.bool).scatter(0, p.abs().topk(15).indices, True), p, 0.0
    ),
}


def test_clip_leaves_rows_inside_the_bound_alone_and_counts_only_rows_above_it():
    d = torch.tensor([[0.3, 0.4], [3.0, 4.0], [6.0, 8.0], [0.0, 0.0]])
    out, m = clip_norm(5.0)(d, _ctx([0, 1, 2, 3]))
    torch.testing.assert_close(out, torch.tensor([[0.3, 0.4], [3.0, 4.0], [3.0, 4.0], [0.0, 0.0]]))
    assert m == {"clipped": 1.0, "mean_norm": pytest.approx((0.5 + 5 + 10 + 0) / 4)}
    # a bound below 1 and above a short row's norm: the row is not rescaled
    out, m = clip_norm(0.8)(d[:1], _ctx([0]))
    assert torch.equal(out, d[:1]) and m["clipped"] == 0.0


def test_sign_codec_decodes_sign_times_mean_magnitude_with_zero_as_positive():
    x = torch.tensor([0.5, -1.5, 0.0, 2.0])
    out = codecs.decode_sign(codecs.encode_sign(x), 4)
    torch.testing.assert_close(out, torch.tensor([1.0, -1.0, 1.0, 1.0]))


def test_stage_state_is_per_stage_and_clients_residuals_are_separate():
    stage = topk(ratio=0.01)
    x = _rows(2)
    state: dict = {}
    stage(x, _ctx([1, 2], 0, state))
    residual = state["residual"]
    assert set(residual) == {1, 2}
    assert not torch.equal(residual[1], residual[2])
    out, m = stage(torch.zeros(1, 1500), replace(_ctx([2], 1), state=state))
    assert m["residual_norm"] == pytest.approx(float(state["residual"][2].norm()), rel=1e-6)


@pytest.mark.parametrize("d", [700, 1500])
def test_the_chosen_bit_width_fits_the_budget_in_payload_bits(d):
    """A budget of B bits buys the widest b whose real payload (encode_uniform's bytes × 8:
    32-bit level count, lo and hi per bucket, then b bits per value) fits in B."""
    from fedtier.upload.compress import choose_bits

    x = torch.randn(d, generator=torch.Generator().manual_seed(d))
    payload_bits = {
        b: 8 * len(codecs.encode_uniform(x, 2**b, torch.Generator().manual_seed(0)))
        for b in range(2, 9)
    }
    for b in range(3, 9):
        header = payload_bits[b] - math.ceil(b * d / 8) * 8
        exact = header + b * d  # the budget for b bits before rounding to whole bytes
        assert choose_bits(x, 1e-12, 2, 8, budget_bits=exact) == b
        assert choose_bits(x, 1e-12, 2, 8, budget_bits=exact - 1) == b - 1
        assert payload_bits[b - 1] <= exact - 1 + 8


def test_the_chosen_bit_width_is_the_fewest_whose_bound_meets_the_target():
    """x = [0, 1, 2, 3]: ‖x‖² = 14 and SPEC §5's bound at b bits is 4·Δ²/4 = 9/(2^b − 1)²
    (9, 1, 9/49, 0.04, 9/961, …); at 2 bits both sides are exactly 1.0."""
    from fedtier.upload.compress import choose_bits

    x = torch.tensor([0.0, 1.0, 2.0, 3.0])
    for b in range(1, 9):
        assert codecs.uniform_error_bound(x, 2**b) == pytest.approx(9 / (2**b - 1) ** 2, rel=1e-6)
    assert codecs.uniform_error_bound(x, 4) == 1.0 == (1 / 14) * 14
    assert choose_bits(x, 1 / 14, 1, 8) == 2  # the bound meets the target exactly at 2 bits
    assert choose_bits(x, 0.99 / 14, 1, 8) == 3
    assert choose_bits(x, 0.2 / 14, 1, 8) == 3  # 9/49 ≈ 0.18
    assert choose_bits(x, 0.01 / 14, 2, 8) == 5  # 0.04 > 0.01 ≥ 9/961
    assert choose_bits(x, 0.01 / 14, 2, 4) == 4  # capped at max_bits
    assert choose_bits(x, 100.0, 3, 8) == 3  # never below min_bits
