"""Quality of generated images (SPEC §9): FID on in-house features, class and region coverage,
source shares, and a sample grid.

Every score takes images ``[N, 1, H, W]`` with values in [-1, 1] and a :class:`Judge`
(:mod:`fedtier.generative.judge`) trained on the real data.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedtier.errors import FedtierError
from fedtier.generative.judge import Judge

FID_NOTE = (
    "FID is computed with torchmetrics' FrechetInceptionDistance on the penultimate-layer "
    "features (128) of an in-house CNN classifier trained on the same data set, not on "
    "Inception-v3 (no pretrained Inception weights offline); values are comparable only "
    "between runs that use the same judge, not with published FIDs."
)
KL_EPSILON = 1e-6  # added to every generated class share before the KL (a missing class costs
# p_c · log(p_c / 1e-6) ≈ 1.15 nats for p_c = 0.1, instead of infinity)
CONFIDENT = 0.9  # a sample is "confident" when the judge's max softmax is at least this
FID_BATCH = 500  # images per feature batch


class _JudgeFeatures(nn.Module):
    """torchmetrics' custom ``feature`` module: images ``[N, C, H, W]`` (float, in [-1, 1],
    passed through unchanged since the module is custom) → features ``[N, F]``.
    ``num_features`` spares torchmetrics its dummy forward pass on a 3×299×299 image."""

    def __init__(self, judge: Judge) -> None:
        super().__init__()
        self.judge = judge
        self.num_features = judge.num_features

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.judge.features(imgs)


class FidScorer:
    """FID against a fixed real set: the real features are extracted once, then
    :meth:`score` compares any number of generated sets with them (FID against round)."""

    def __init__(self, real: torch.Tensor, judge: Judge) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        _check_count(real, "real")
        self.judge = judge
        self._metric = FrechetInceptionDistance(
            feature=_JudgeFeatures(judge), reset_real_features=False, normalize=False
        )
        for chunk in real.split(FID_BATCH):
            self._metric.update(chunk.float(), real=True)

    def score(self, fake: torch.Tensor) -> float:
        """FID between the real set and ``fake`` ``[M, 1, H, W]`` (M ≥ 2)."""
        _check_count(fake, "fake")
        self._metric.reset()  # keeps the real features (reset_real_features=False)
        for chunk in fake.split(FID_BATCH):
            self._metric.update(chunk.float(), real=False)
        return float(self._metric.compute())


def fid(real: torch.Tensor, fake: torch.Tensor, judge: Judge) -> float:
    """Fréchet distance between the judge's features of ``real`` and ``fake`` images:
    ‖μ_r − μ_f‖² + Tr(Σ_r + Σ_f − 2 (Σ_r Σ_f)^{1/2}) (Heusel et al., 2017), computed by
    torchmetrics' ``FrechetInceptionDistance`` with the judge as feature network (FID_NOTE)."""
    return FidScorer(real, judge).score(fake)


def class_coverage(
    fake: torch.Tensor,
    judge: Judge,
    data_labels: torch.Tensor | np.ndarray,
    *,
    confident: float = CONFIDENT,
) -> dict[str, Any]:
    """How the generated samples spread over the judge's classes.

    Each sample is assigned its argmax class. Returns:

    - ``class_shares`` [C]: share of samples assigned to each class;
    - ``data_shares`` [C]: the class distribution of ``data_labels`` (the real data);
    - ``kl_data_generated``: KL(p_data ‖ q_gen) = Σ_c p_c log(p_c / q_c) in nats, with
      q = (class_shares + ε) / (1 + C ε), ε = :data:`KL_EPSILON`. This direction weighs each
      class by its share in the data, so a data class the generator drops (mode collapse)
      costs a lot, while classes absent from the data add nothing; the reverse KL(q ‖ p) would
      barely notice a missing class;
    - ``mean_confidence``: mean over samples of the max softmax probability;
    - ``confident_share``: share of samples whose max softmax is ≥ ``confident``;
    - ``confident_class_shares`` [C]: share of all samples assigned to each class with max
      softmax ≥ ``confident``.
    """
    probs = _probs(fake, judge)
    c = judge.num_classes
    labels = np.asarray(torch.as_tensor(data_labels).cpu().numpy(), dtype=np.int64)
    if labels.ndim != 1 or len(labels) == 0 or labels.min() < 0 or labels.max() >= c:
        raise FedtierError(
            f"class_coverage: data_labels must be a non-empty [N] array in 0..{c - 1}"
        )
    _check_threshold(confident)
    top, assigned = probs.max(dim=1)
    n = len(probs)
    shares = np.bincount(assigned.numpy(), minlength=c) / n
    sure = top.numpy() >= confident
    sure_shares = np.bincount(assigned.numpy()[sure], minlength=c) / n
    data = np.bincount(labels, minlength=c) / len(labels)
    q = (shares + KL_EPSILON) / (1 + c * KL_EPSILON)
    present = data > 0
    kl = float(np.sum(data[present] * np.log(data[present] / q[present])))
    return {
        "class_shares": shares.tolist(),
        "data_shares": data.tolist(),
        "kl_data_generated": kl,
        "mean_confidence": float(top.mean()),
        "confident_share": float(sure.mean()),
        "confident_class_shares": sure_shares.tolist(),
        "confident": confident,
    }


def region_coverage(
    fake: torch.Tensor,
    judge: Judge,
    region_classes: list[list[int]],
    *,
    confident: float = CONFIDENT,
    min_share: float | None = None,
) -> dict[str, Any]:
    """Per region, the fraction of its classes that the generator produces confidently.

    A class c is *produced* when at least ``min_share`` of all samples are assigned to c
    (argmax) with max softmax ≥ ``confident``. The default ``min_share`` is a quarter of a
    uniform share, 0.25 / C (2.5% for 10 classes): an untrained generator's blurry samples fall
    mostly into one class, usually without confidence, so they produce at most that one.
    Returns ``fraction`` [regions] (produced classes of the region / its classes),
    ``produced`` [regions][...] (the produced classes of each region), ``mean_fraction``, and
    the thresholds used.
    """
    c = judge.num_classes
    share = 0.25 / c if min_share is None else min_share
    if not (0 < share <= 1):
        raise FedtierError(f"region_coverage: min_share must lie in (0, 1], got {share}")
    _check_threshold(confident)
    if not region_classes or any(
        not r or any(not 0 <= int(k) < c for k in r) for r in region_classes
    ):
        raise FedtierError(
            "region_coverage: region_classes must be a non-empty list of non-empty class "
            f"lists, classes in 0..{c - 1}; got {region_classes}"
        )
    probs = _probs(fake, judge)
    top, assigned = probs.max(dim=1)
    sure_shares = np.bincount(assigned.numpy()[top.numpy() >= confident], minlength=c) / len(probs)
    produced = [[int(k) for k in r if sure_shares[int(k)] >= share] for r in region_classes]
    fractions = [len(p) / len(r) for p, r in zip(produced, region_classes)]
    return {
        "fraction": fractions,
        "produced": produced,
        "mean_fraction": float(np.mean(fractions)),
        "confident": confident,
        "min_share": share,
    }


def source_shares(fake: torch.Tensor, source_judge: Judge) -> list[float]:
    """Share of generated samples that the source judge assigns (argmax) to each source."""
    assigned = _probs(fake, source_judge).argmax(dim=1)
    return (
        np.bincount(assigned.numpy(), minlength=source_judge.num_classes) / len(assigned)
    ).tolist()


def fid_per_source(
    fake: torch.Tensor, scorers: list[FidScorer], source_judge: Judge
) -> list[float | None]:
    """FID per source: the generated samples that ``source_judge`` assigns (argmax) to source s
    against ``scorers[s]`` (a :class:`FidScorer` on source s's real images); None for a source
    given fewer than 2 samples (FID undefined: a generator that never makes that style)."""
    if len(scorers) != source_judge.num_classes:
        raise FedtierError(
            f"fid_per_source: {len(scorers)} scorers for {source_judge.num_classes} sources"
        )
    assigned = _probs(fake, source_judge).argmax(dim=1)
    return [
        scorer.score(fake[assigned == s]) if int((assigned == s).sum()) >= 2 else None
        for s, scorer in enumerate(scorers)
    ]


def sample_grid(
    images: torch.Tensor,
    path: str | Path,
    nrow: int = 10,
    *,
    padding: int = 2,
    scale: int = 1,
) -> Path:
    """Write ``images`` ``[N, 1, H, W]`` in [-1, 1] as one grayscale PNG at ``path``.

    A pixel v becomes round((clamp(v, -1, 1) + 1) · 127.5) in 0..255; each image is enlarged
    ``scale`` times (nearest neighbour, for 8×8 samples); images fill rows of ``nrow`` left to
    right, separated and framed by ``padding`` pixels of mid-grey (128). The PNG measures
    ``rows·H·scale + (rows+1)·padding`` by ``cols·W·scale + (cols+1)·padding`` with
    ``cols = min(nrow, N)`` and ``rows = ceil(N / nrow)``.
    """
    from PIL import Image

    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 1:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise FedtierError(f"sample_grid: images must be [N, 1, H, W], got {got}")
    if len(images) == 0 or nrow < 1 or padding < 0 or scale < 1:
        raise FedtierError(
            f"sample_grid needs N >= 1 images, nrow >= 1, padding >= 0, scale >= 1; got "
            f"N = {len(images)}, nrow = {nrow}, padding = {padding}, scale = {scale}"
        )
    grey = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pixels = grey[:, 0].numpy()
    if scale > 1:
        pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w = pixels.shape
    cols, rows = min(nrow, n), math.ceil(n / nrow)
    grid = np.full(
        (rows * h + (rows + 1) * padding, cols * w + (cols + 1) * padding), 128, np.uint8
    )
    for i in range(n):
        r, c = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        grid[top : top + h, left : left + w] = pixels[i]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid, mode="L").save(out, format="PNG")
    return out


def quality(
    fake: torch.Tensor,
    judge: Judge,
    data_labels: torch.Tensor | np.ndarray,
    *,
    fid_against: FidScorer | None = None,
    region_classes: list[list[int]] | None = None,
    source_judge: Judge | None = None,
    confident: float = CONFIDENT,
) -> dict[str, float]:
    """Every score of ``fake`` as one flat dict of numbers (for metrics.jsonl / summary.json):

    ``fid`` (when ``fid_against`` is given), ``kl_data_generated``, ``mean_confidence``,
    ``confident_share``, ``class_share/<c>`` per class; with ``region_classes``
    ``region_coverage/<r>`` per region and ``region_coverage/mean``; with ``source_judge``
    ``source_share/<s>`` per source. See :func:`class_coverage` and :func:`region_coverage`
    for the definitions.
    """
    out: dict[str, float] = {}
    if fid_against is not None:
        out["fid"] = fid_against.score(fake)
    cov = class_coverage(fake, judge, data_labels, confident=confident)
    for name in ("kl_data_generated", "mean_confidence", "confident_share"):
        out[name] = cov[name]
    out.update({f"class_share/{c}": v for c, v in enumerate(cov["class_shares"])})
    if region_classes is not None:
        reg = region_coverage(fake, judge, region_classes, confident=confident)
        out.update({f"region_coverage/{r}": v for r, v in enumerate(reg["fraction"])})
        out["region_coverage/mean"] = reg["mean_fraction"]
    if source_judge is not None:
        shares = source_shares(fake, source_judge)
        out.update({f"source_share/{s}": v for s, v in enumerate(shares)})
    return out


def _probs(fake: torch.Tensor, judge: Judge) -> torch.Tensor:
    if not isinstance(fake, torch.Tensor) or len(fake) == 0:
        raise FedtierError("generated samples must be a non-empty tensor [N, 1, H, W]")
    return judge.probs(fake).cpu()


def _check_count(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or len(x) < 2:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise FedtierError(f"FID needs at least 2 {what} images [N, C, H, W], got {got}")


def _check_threshold(confident: float) -> None:
    if not (0 < confident <= 1):
        raise FedtierError(f"confidence threshold must lie in (0, 1], got {confident}")
