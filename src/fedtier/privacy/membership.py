"""Loss-threshold membership inference (Yeom et al. 2018, "Privacy Risk in Machine
Learning: Analyzing the Connection to Overfitting", CSF): the attacker scores a sample by
−ℓ(f(x), y) and calls it a member of the training set when the score is above a threshold.
Its success over all thresholds is the ROC AUC of the scores of members (label 1) against
non-members (label 0): 0.5 is chance, 1.0 separates them perfectly."""

from __future__ import annotations

import torch
from sklearn.metrics import roc_auc_score
from torch import nn


@torch.no_grad()
def loss_scores(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000
) -> torch.Tensor:
    """[N] membership scores −ℓ(f(x_i), y_i) (per-sample cross entropy), in eval mode."""
    mode = model.training
    model.eval()
    try:
        out = [
            -nn.functional.cross_entropy(
                model(x[i : i + batch_size]), y[i : i + batch_size], reduction="none"
            )
            for i in range(0, len(x), batch_size)
        ]
    finally:
        model.train(mode)
    return torch.cat(out).double().cpu()


def membership_auc(members: torch.Tensor, non_members: torch.Tensor) -> float:
    """ROC AUC of the scores [M] of members against the scores [N] of non-members
    (sklearn.metrics.roc_auc_score; ties count one half)."""
    if len(members) == 0 or len(non_members) == 0:
        raise ValueError("membership AUC needs at least one member and one non-member")
    labels = [1] * len(members) + [0] * len(non_members)
    scores = torch.cat([members, non_members]).numpy()
    return float(roc_auc_score(labels, scores))
