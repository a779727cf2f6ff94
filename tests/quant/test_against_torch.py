"""The quantizers against PyTorch's own fake-quantization kernels, and the grid that the qcheck
screen reads (`fedtier.quant.model.grid`) against the closed form of its step."""

import numpy as np
import pytest
import torch
from torch import nn

from fedtier.quant import (
    QuantSpec,
    affine_channel_quantize,
    affine_quantize,
    grid,
    paper_quantize,
    quantize_copy,
)
from fedtier.quant.model import distinct_levels


def _w(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int):
    """Min/max asymmetric qparams over [0, 2^b − 1] (the ranges below contain 0)."""
    scale = (hi - lo) / (2**bits - 1)
    return scale, torch.round(-lo / scale)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_affine_is_torch_fake_quantize_per_tensor(bits):
    w = _w(6, 5, seed=bits)
    scale, zp = _qparams(w.min(), w.max(), bits)
    ref = torch.fake_quantize_per_tensor_affine(w, float(scale), int(zp), 0, 2**bits - 1)
    torch.testing.assert_close(affine_quantize(w, bits), ref)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_affine_channel_is_torch_fake_quantize_per_channel_on_a_non_square_weight(bits):
    # [out=3, in=4, k=2]: the channels are dimension 0, neither 4 nor 2 rows of anything else
    w = _w(3, 4, 2, seed=bits) * torch.tensor([0.1, 1.0, 10.0])[:, None, None]
    flat = w.reshape(3, -1)
    scale, zp = _qparams(flat.min(1).values, flat.max(1).values, bits)
    ref = torch.fake_quantize_per_channel_affine(w, scale, zp.to(torch.int32), 0, 0, 2**bits - 1)
    torch.testing.assert_close(affine_channel_quantize(w, bits), ref)


def test_affine_channel_of_a_vector_is_the_per_tensor_quantizer():
    b = _w(7, seed=3)
    scale, zp = _qparams(b.min(), b.max(), 3)
    ref = torch.fake_quantize_per_tensor_affine(b, float(scale), int(zp), 0, 7)
    torch.testing.assert_close(affine_channel_quantize(b, 3), ref)
    assert affine_channel_quantize(b, 32) is b


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_paper_quantizer_is_a_symmetric_fake_quantize_with_the_range_scale(bits):
    # eq. (5)–(6): grid step 1/s_b = (max − min) / (2^b − 1), zero point 0, codes in
    # [−2^{b−1}, 2^{b−1} − 1]
    w = _w(40, seed=bits) + 0.4  # off-centre, so the top level clips
    step = float(w.max() - w.min()) / (2**bits - 1)
    ref = torch.fake_quantize_per_tensor_affine(w, step, 0, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    torch.testing.assert_close(paper_quantize(w, bits), ref)


@pytest.mark.parametrize("shape", [(3, 2, 2), (3, 4)])  # a conv and a linear weight
@pytest.mark.parametrize("quantizer", ["paper", "affine", "affine-channel"])
def test_grid_groups_and_step_are_the_quantizers(quantizer, shape):
    spec = QuantSpec(quantizer)
    w = _w(*shape, seed=1) * torch.tensor([0.5, 1.0, 3.0]).reshape(3, *[1] * (len(shape) - 1))
    g, gq, step = grid(w, spec, 3)
    per_channel = quantizer == "affine-channel"
    rows = 3 if per_channel else 1
    assert g.shape == gq.shape == (rows, 12 // rows) and step.shape == (rows, 1)
    groups = w.numpy().reshape(rows, -1)
    np.testing.assert_array_equal(g.numpy(), groups)
    torch.testing.assert_close(gq, spec.fn()(w, 3).reshape(rows, -1))
    expected = (groups.max(1) - groups.min(1)) / 7
    np.testing.assert_allclose(step[:, 0].numpy(), expected, rtol=1e-6)
    # the step is the grid's: quantized values are whole multiples of it from the group's
    # lowest level, and (apart from the paper's clipped top) within half a step of w
    k = (gq - gq.min(1, keepdim=True).values) / step
    torch.testing.assert_close(k, k.round(), atol=1e-4, rtol=0)
    if quantizer != "paper":
        assert ((g - gq).abs() <= step / 2 + 1e-6).all()


def test_grid_of_a_vector_is_one_group_for_every_quantizer():
    b = _w(9, seed=4)
    g, _, step = grid(b, QuantSpec("affine-channel"), 4)
    assert g.shape == (1, 9)
    assert float(step) == pytest.approx(float(b.max() - b.min()) / 15)


def test_distinct_levels_counts_the_values_of_the_selected_tensors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    q = quantize_copy(model, QuantSpec("paper", "all"), 2)
    counts = dict(distinct_levels(q, QuantSpec("paper", "all")))
    assert counts == {n: len(np.unique(p.detach().numpy())) for n, p in q.named_parameters()}
    assert all(c <= 4 for c in counts.values())
    assert dict(distinct_levels(model, QuantSpec("paper", "weights"))) == {
        "0.weight": 20,
        "2.weight": 12,
    }
