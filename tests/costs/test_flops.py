"""FLOP counting against a hand count on a tiny conv/linear model."""

import torch
from torch import nn

from fedtier.costs.flops import count_flops, training_flops
from fedtier.tasks import ClassificationTask

# Conv2d(1→2, 3×3) on 1×5×5: 2·3·3 outputs × 9 multiply-adds = 162 MACs = 324 FLOPs;
# Linear(18→4): 72 MACs = 144 FLOPs. Forward: 468.
# Backward: the conv's weight gradient (324; its input needs no gradient) and the linear's
# input and weight gradients (144 + 144): 612. One training step: 1,080.
FORWARD, BACKWARD = 468, 612


def _tiny():
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(18, 4))


def test_forward_flops_match_the_hand_count():
    m, x = _tiny(), torch.randn(1, 1, 5, 5)
    assert count_flops(lambda: m(x)) == FORWARD


def test_training_flops_are_forward_plus_backward_and_leave_the_model_alone():
    m = _tiny()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    sample = (torch.randn(1, 1, 5, 5), torch.tensor([2]))
    assert training_flops(m, ClassificationTask(4), sample) == FORWARD + BACKWARD
    assert all(p.grad is None for p in m.parameters())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
