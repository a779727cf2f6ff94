"""Scoring generative models (SPEC §9): an in-house judge classifier, FID on its features,
class / region / source coverage, and sample grids.

Images are ``[N, 1, H, W]`` in [-1, 1] throughout; :func:`to_pm1` maps a standardised
fedtier data set there.
"""

from fedtier.generative.judge import Judge, cache_dir, to_pm1, train_judge
from fedtier.generative.metrics import (
    FID_NOTE,
    FidScorer,
    class_coverage,
    fid,
    region_coverage,
    sample_grid,
    source_shares,
)

__all__ = [
    "FID_NOTE",
    "FidScorer",
    "Judge",
    "cache_dir",
    "class_coverage",
    "fid",
    "region_coverage",
    "sample_grid",
    "source_shares",
    "to_pm1",
    "train_judge",
]
