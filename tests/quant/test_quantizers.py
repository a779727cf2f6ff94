import pytest
import torch
from torch import nn

from fedtier.errors import UnknownNameError
from fedtier.quant import (
    QUANTIZERS,
    QuantSpec,
    affine_channel_quantize,
    forward_quantized,
    get_quantizer,
    paper_quantize,
    quantize_copy,
    ste,
)


def test_paper_quantizer_matches_equation_5_6_by_hand():
    w = torch.tensor([-1.0, -0.5, 0.0, 0.2, 1.0])
    # b = 4: s = (7 - (-8)) / (1 - (-1)) = 7.5; round(w*s) = [-8, -4, 0, 2, 8] -> clip 8 to 7
    expected = torch.tensor([-8.0, -4.0, 0.0, 2.0, 7.0]) / 7.5
    torch.testing.assert_close(paper_quantize(w, 4), expected)


def test_paper_quantizer_clips_off_centre_tensors_hard():
    gamma = torch.linspace(0.9, 1.1, 16)  # BatchNorm gains: range far from zero
    q = paper_quantize(gamma, 8)
    s = 255 / 0.2
    assert torch.allclose(q, torch.full_like(q, 127 / s))  # every value collapses to the top level


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
@pytest.mark.parametrize("bits", [8, 6, 4, 2])
def test_at_most_2_pow_b_levels(name, bits):
    w = torch.randn(64, 9, generator=torch.Generator().manual_seed(0))
    q = get_quantizer(name)(w, bits)
    if name == "affine-channel":
        assert max(torch.unique(row).numel() for row in q) <= 2**bits
    else:
        assert torch.unique(q).numel() <= 2**bits


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_32_bits_is_identity_and_error_shrinks_with_bits(name):
    w = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    q = get_quantizer(name)
    assert q(w, 32) is w
    errors = [(q(w, b) - w).pow(2).mean().item() for b in (2, 4, 6, 8)]
    assert errors == sorted(errors, reverse=True)


def test_affine_error_bounded_by_half_step():
    w = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    step = (w.max() - w.min()) / 255
    assert (get_quantizer("affine")(w, 8) - w).abs().max() <= step / 2 + 1e-6


def test_affine_channel_uses_each_rows_range():
    w = torch.stack([torch.linspace(0, 1, 10), torch.linspace(-100, 100, 10)])
    q = affine_channel_quantize(w, 4)
    assert (q[0] - w[0]).abs().max() <= 1 / 15 / 2 + 1e-6  # row 0 not dragged by row 1's scale


def test_ste_passes_gradient_unchanged():
    w = torch.randn(10, requires_grad=True)
    g = torch.randn(10)
    (ste(w, paper_quantize, 4) * g).sum().backward()
    torch.testing.assert_close(w.grad, g)


def test_ste_keeps_a_channels_last_weight_with_one_input_channel_channels_last():
    # [16, 1, 5, 5] is contiguous in both layouts; elementwise ops pick NCHW strides, which
    # would send the quantized pass of a channels-last CNN down the slower NCHW kernels.
    conv = nn.Conv2d(1, 16, 5, padding=2).to(memory_format=torch.channels_last)
    w = conv.weight
    q = ste(w, paper_quantize, 8)
    assert q.stride() == w.stride() != paper_quantize(w.detach(), 8).stride()
    torch.testing.assert_close(q, paper_quantize(w.detach(), 8), atol=0, rtol=0)
    x = torch.randn(2, 1, 8, 8).contiguous(memory_format=torch.channels_last)
    out = nn.functional.conv2d(x, q, conv.bias, padding=2)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_unknown_quantizer_lists_known():
    with pytest.raises(UnknownNameError, match="affine-channel"):
        get_quantizer("int3")


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def test_quantize_copy_leaves_live_model_alone_and_quantizes_every_tensor():
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quantize_copy(model, QuantSpec("paper", "all"), 4)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    for name, p in q.named_parameters():
        assert torch.unique(p).numel() <= 16, name


def test_weights_only_spec_keeps_biases_and_bn():
    model = _net()
    q = quantize_copy(model, QuantSpec("paper", "weights"), 4)
    assert torch.equal(q[0].bias, model[0].bias)
    assert torch.equal(q[1].weight, model[1].weight)
    assert not torch.equal(q[0].weight, model[0].weight)


def test_forward_quantized_equals_quantized_copy_and_sends_gradient_to_fp32_weights():
    model = _net().eval()
    spec = QuantSpec("paper", "all")
    x = torch.randn(5, 6)
    out = forward_quantized(model, x, spec, 4)
    torch.testing.assert_close(out, quantize_copy(model, spec, 4).eval()(x))
    out.sum().backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0


def test_affine_clips_the_top_code_when_both_ends_round_up():
    # [-1.5, 1.5] at 2 bits: scale 1, zero point round(1.5) = 2, and 1.5 rounds (half to even)
    # to 2, code 4 > 3: the top value lands on the top level (1.0), as torch's kernel does
    w = torch.tensor([-1.5, -0.2, 0.6, 1.5])
    ref = torch.fake_quantize_per_tensor_affine(w, 1.0, 2, 0, 3)
    torch.testing.assert_close(get_quantizer("affine")(w, 2), ref)
    assert float(get_quantizer("affine")(w, 2).max()) == 1.0


def test_full_precision_is_the_tensor_and_the_model_themselves():
    from fedtier.quant import quantized_view

    w = torch.randn(4, requires_grad=True)
    assert ste(w, paper_quantize, 32) is w
    model = _net()
    assert quantized_view(model, QuantSpec(), 32) is model
    assert quantized_view(model, QuantSpec(), 8) is not model


class _Scaled(nn.Module):
    """A model whose forward takes a keyword input, like a denoiser's timestep."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x, *, scale=1.0):
        return self.lin(x) * scale


def test_the_quantized_view_passes_keyword_inputs_through():
    from fedtier.quant import quantized_view

    torch.manual_seed(0)
    model = _Scaled()
    x = torch.randn(4, 3)
    view = quantized_view(model, QuantSpec("affine"), 4)
    ref = quantize_copy(model, QuantSpec("affine"), 4)
    torch.testing.assert_close(view(x, scale=3.0), ref(x, scale=3.0))
    torch.testing.assert_close(view(x, scale=3.0), 3 * view(x))


def test_unknown_quantizer_message_names_the_kind_and_the_close_name():
    with pytest.raises(UnknownNameError) as e:
        get_quantizer("afine")
    assert str(e.value) == (
        "unknown quantizer 'afine'. Known quantizers: affine, affine-channel, paper. "
        "Did you mean 'affine'?"
    )
