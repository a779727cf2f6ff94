"""Loss-threshold membership inference (fedtier.privacy.membership): scores against the
closed-form cross entropy, AUC against a brute-force count over all (member, non-member)
pairs, and a hand-made model that memorised some of its training points."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from fedtier.privacy.membership import loss_scores, membership_auc


def brute_force_auc(members, non_members):
    """P(score_member > score_non_member) + ½ P(tie) over all pairs."""
    wins = sum(
        1.0 if m > n else 0.5 if m == n else 0.0
        for m in members.tolist()
        for n in non_members.tolist()
    )
    return wins / (len(members) * len(non_members))


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_the_pairwise_count(seed):
    rng = np.random.default_rng(seed)
    m = torch.from_numpy(rng.integers(0, 6, size=int(rng.integers(1, 12))).astype(float))
    n = torch.from_numpy(rng.integers(0, 6, size=int(rng.integers(1, 12))).astype(float))
    assert membership_auc(m, n) == pytest.approx(brute_force_auc(m, n))


def memoriser():
    """Logits W x with x one-hot over 16 slots: slots 0..3 are memorised members (logit 10 on
    their label), slots 4..7 members it did not learn, 8..15 non-members (all logits 0)."""
    model = nn.Linear(16, 4, bias=False)
    with torch.no_grad():
        model.weight.zero_()
        for slot in range(4):
            model.weight[slot % 4, slot] = 10.0
    return model


def test_a_model_that_memorised_some_members_is_caught():
    model = memoriser()
    x, y = torch.eye(16), torch.arange(16) % 4
    scores = loss_scores(model, x, y, batch_size=5)
    # memorised: −log(e¹⁰ / (e¹⁰ + 3)); the rest: uniform logits, −log 4
    memorised = -math.log(math.exp(10) / (math.exp(10) + 3))
    assert scores[:4].tolist() == pytest.approx([-memorised] * 4, rel=1e-3)  # float32 logits
    assert scores[4:].tolist() == pytest.approx([-math.log(4)] * 12, rel=1e-6)
    assert membership_auc(scores[:4], scores[8:]) == 1.0
    # half the members memorised, half tied with every non-member: ½ · 1 + ½ · ½
    assert membership_auc(scores[:8], scores[8:]) == pytest.approx(0.75)
    assert membership_auc(scores[4:8], scores[8:]) == pytest.approx(0.5)


def test_auc_needs_both_groups():
    with pytest.raises(ValueError, match="at least one member"):
        membership_auc(torch.tensor([]), torch.tensor([1.0]))
