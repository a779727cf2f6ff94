"""Each client's training samples by client id, as plain data.

A :class:`ClientData` is what an arm's clients train on: the data set's inputs (one view, or
one per region in the label-related scenario), its labels, and each client's sample indices.
It holds tensors and arrays only (no closure), so it pickles: a worker process receives it
once and looks clients up by id (:mod:`fedtier.local.jobs`), under ``fork`` and ``spawn``
alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True, eq=False)
class ClientData:
    """Client id → (x [n_c, ...], y [n_c]).

    ``views`` holds the inputs [N, ...] as one view, or one per region; ``view_of`` [clients]
    says which view each client sees (None: the first for all). ``parts[c]`` are client c's
    sample indices into the views and ``y`` [N].
    """

    views: tuple[torch.Tensor, ...]
    y: torch.Tensor
    parts: tuple[np.ndarray, ...]
    view_of: np.ndarray | None = None

    def __call__(self, client: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(self.parts[client])
        x = self.views[0 if self.view_of is None else int(self.view_of[client])]
        return x[idx], self.y[idx]

    def __len__(self) -> int:
        return len(self.parts)
