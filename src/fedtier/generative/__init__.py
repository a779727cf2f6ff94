"""Scoring generative models (SPEC §9): an in-house judge classifier, FID on its features,
class / region / source coverage, and sample grids.

Images are ``[N, 1, H, W]`` in [-1, 1] throughout; :func:`to_pm1` maps a standardised
fedtier data set there. The judge is trained once per (data, labels, settings) and cached
under ``$FEDTIER_CACHE/judges`` (default ``~/.cache/fedtier/judges``). FID here uses the
judge's features, not Inception's: print :data:`FID_NOTE` beside every FID.

Example (a generator ``G`` mapping ``z`` [N, 100] to images in [-1, 1])::

    from fedtier.data import load_dataset
    from fedtier.generative import (
        FID_NOTE, FidScorer, dataset_judge, fid_per_source, quality, sample_grid, to_pm1,
    )

    train, test = load_dataset("multisource-mnist")
    judge = dataset_judge(train, seed=0)                 # digit classes (≈ 20 s, then cached)
    sources = dataset_judge(train, seed=0, by="source")  # 0 mnist, 1 digits, 2 inverted
    real = to_pm1(train.x, train)
    scorer = FidScorer(real, judge)                      # real features once; score per round
    per_source = [FidScorer(real[train.source == s], judge) for s in range(3)]

    fake = G(torch.randn(10_000, 100, generator=g)).detach()
    scores = quality(
        fake, judge, train.y, fid_against=scorer,
        region_classes=[[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]], source_judge=sources,
    )  # {"fid": …, "kl_data_generated": …, "mean_confidence": …, "class_share/3": …,
    #     "region_coverage/0": …, "source_share/1": …}
    fid_by_source = fid_per_source(fake, per_source, sources)  # None: style never generated
    sample_grid(fake[:100], run_dir / "samples.png", nrow=10)
    print(FID_NOTE)

For 16×16 or 8×8 models, pass ``size=16`` to :func:`dataset_judge` and score images resized
the same way (:func:`resize_images`).
"""

from fedtier.generative.judge import (
    Judge,
    cache_dir,
    dataset_judge,
    resize_images,
    to_pm1,
    train_judge,
)
from fedtier.generative.metrics import (
    FID_NOTE,
    FidScorer,
    class_coverage,
    fid,
    fid_per_source,
    quality,
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
    "dataset_judge",
    "fid",
    "fid_per_source",
    "quality",
    "region_coverage",
    "resize_images",
    "sample_grid",
    "source_shares",
    "to_pm1",
    "train_judge",
]
