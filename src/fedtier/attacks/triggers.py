"""Backdoor triggers: a square patch stamped at a corner of the image (QAFed §4; Hong et al.)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left")


@dataclass(frozen=True)
class Trigger:
    """A ``size``×``size`` patch of ``value`` at ``position``; inputs carrying it should be
    classified as ``target``. ``part`` = (j, parts) keeps only the j-th of ``parts`` row
    strips of the patch (the local triggers of DBA, Xie et al. 2020)."""

    size: int
    position: str
    value: float
    target: int
    part: tuple[int, int] | None = None

    def mask(self, height: int, width: int) -> torch.Tensor:
        """[H, W] bool: the pixels the trigger overwrites."""
        s = self.size
        top = 0 if self.position.startswith("top") else height - s
        left = 0 if self.position.endswith("left") else width - s
        m = torch.zeros(height, width, dtype=torch.bool)
        rows = range(s)
        if self.part is not None:
            j, parts = self.part
            rows = range(j * s // parts, (j + 1) * s // parts)
        for r in rows:
            m[top + r, left : left + s] = True
        return m

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        """A copy of x [B, C, H, W] with the trigger applied on every channel."""
        m = self.mask(x.shape[-2], x.shape[-1]).to(x.device)
        return torch.where(m, torch.full_like(x, self.value), x)

    def with_part(self, j: int, parts: int) -> Trigger:
        return Trigger(self.size, self.position, self.value, self.target, (j % parts, parts))
