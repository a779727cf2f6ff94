import torch
from torch import nn

from fedtier.quant import QuantSpec, forward_quantized, quantize_copy
from fedtier.quant.bnstats import add_bit_stats, nearest_stats, stat_bits


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))


def test_quantized_pass_updates_only_its_own_statistics():
    model = _net().train()
    add_bit_stats(model, [8, 4])
    bn = model[1]
    before = {n: b.clone() for n, b in bn.named_buffers()}
    forward_quantized(model, torch.randn(16, 4) * 3 + 1, QuantSpec(), 4)
    changed = {n for n, b in bn.named_buffers() if not torch.equal(b, before[n])}
    assert {"running_mean_q4", "running_var_q4"} <= changed
    assert not changed & {"running_mean", "running_var", "running_mean_q8", "running_var_q8"}


def test_deployment_uses_nearest_precision_statistics():
    model = _net()
    add_bit_stats(model, [8, 4])
    assert stat_bits(model) == [4, 8]
    assert nearest_stats(model, 32) is None
    assert nearest_stats(model, 5) == 4
    assert nearest_stats(model, 6) == 8  # tie goes to the higher precision
    assert nearest_stats(model, 24) is None  # closer to fp32
    model[1].running_mean_q4.fill_(7.0)
    assert torch.all(quantize_copy(model, QuantSpec(), 4)[1].running_mean == 7.0)
    assert torch.all(model[1].running_mean == 0.0)  # live model untouched


def test_models_without_bit_stats_are_unchanged():
    model = _net()
    assert stat_bits(model) == [] and nearest_stats(model, 4) is None


def test_adding_bit_statistics_again_keeps_the_ones_learnt():
    model = _net().train()
    add_bit_stats(model, [4])
    forward_quantized(model, torch.randn(16, 4) * 3 + 1, QuantSpec(), 4)
    learnt = model[1].running_mean_q4.clone()
    assert not torch.equal(learnt, model[1].running_mean)
    add_bit_stats(model, [4, 2])  # e.g. a resumed run re-declares its bit set
    assert torch.equal(model[1].running_mean_q4, learnt)
    assert torch.equal(model[1].running_mean_q2, model[1].running_mean)
    assert stat_bits(model) == [2, 4]


def test_root_batchnorm_uses_its_own_bit_statistics():
    # a model that is itself a BatchNorm: its buffers are "running_mean", with no prefix
    model = nn.BatchNorm1d(3).train()
    add_bit_stats(model, [4])
    forward_quantized(model, torch.randn(8, 3) + 2, QuantSpec(), 4)
    assert not torch.equal(model.running_mean_q4, torch.zeros(3))
    assert torch.equal(model.running_mean, torch.zeros(3))
