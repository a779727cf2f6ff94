"""The server learning rate, in one place (FedOpt style).

Two weightings of QAFed §1 / Algorithm 1:

* ``qafed``:  w_{t+1} = w_t + η_s · Σ_{s∈S_t} Σ_{i∈C_s} Δ_i / N, with N the whole population.
  Computed as an unweighted mean of the m_t sampled deltas times η_s · m_t / N, so the edge
  and cloud rules stay means; η_s = N / m gives plain (unweighted) FedAvg.
* ``fedavg``: w_{t+1} = w_t + η · Σ n_i Δ_i / Σ n_i (sample-count weighted), η = 1 by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def client_weights(rule: str, num_samples: torch.Tensor) -> torch.Tensor:
    """Row weights for the edge's mean: sample counts (fedavg) or ones (qafed)."""
    return (
        num_samples.float()
        if rule == "fedavg"
        else torch.ones_like(num_samples, dtype=torch.float32)
    )


@dataclass(frozen=True)
class ServerStep:
    rule: str  # "qafed" or "fedavg"
    server_lr: float  # η_s (qafed) or η (fedavg)
    population: int  # N

    def apply(self, w: torch.Tensor, mean_update: torch.Tensor, sampled: int) -> torch.Tensor:
        scale = (
            self.server_lr * sampled / self.population if self.rule == "qafed" else self.server_lr
        )
        return w + scale * mean_update
