"""Trigger detection at the edge during collaborative sampling (SS-Diff's sampling phase,
SPEC §8).

The edge runs the first t denoising steps of a batch of device noises x_T and measures, per
input, d_i = ‖x_{T−t,i} − x_{T,i}‖₂ (:func:`step_distance`). Triggered and clean inputs are
told apart by an unsupervised split of {d_i} into two groups (:func:`split`):

* ``average``: threshold at the mean of d;
* ``maxsplit``: at the largest gap between consecutive sorted values;
* ``max-min``: at the midpoint of the largest and smallest value;
* ``kmeans``: 1-D 2-means (scikit-learn's ``KMeans``, k = 2, seeded).

Each splits any batch in two, even an all-clean one, so :func:`detect` guards the split: the
edge draws clean reference batches of its own noise (it knows they are clean), measures the
spread of their d (:class:`Reference`), and flags a group only when the two groups' means are
more than ``guard`` × that spread apart. The flagged group is the one whose mean is farther
from the clean reference's median (a trigger may lengthen or shorten the first steps).

A baseline that samples nothing (:func:`chi2_flags`): under clean noise ‖x_T‖² ~ χ²_d,
d = C·H·W; an input whose two-sided p-value is below α is flagged (DisDet reports that input
statistics alone expose known triggers).

Responses to the flagged inputs (applied in :func:`fedtier.defenses.sampling` callers):
``reject`` (no image is returned), ``replace`` (fresh noise from a seeded stream, sampled
again from the start) and ``itc``. The seed says "ITC"; our reading is BadDiffusion's
inference-time clipping: the remaining steps run with the predicted x̂_0 clamped to [−1, 1]
at every step (diffusers' ``clip_sample``). That reading is ours, not the paper's text.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import numpy as np
import torch

from fedtier.errors import ConfigError

DETECTORS = ("average", "maxsplit", "max-min", "kmeans")
RESPONSES = ("reject", "replace", "itc")


def step_distance(x_T: torch.Tensor, x_mid: torch.Tensor) -> torch.Tensor:
    """d_i = ‖x_{T−t,i} − x_{T,i}‖₂ for batches [B, C, H, W] → [B]."""
    return (x_mid - x_T).flatten(1).norm(dim=1)


def check_detector(name: str, field: str = "detector") -> str:
    """``name`` if it is a detector, else :class:`ConfigError` on ``field`` with a
    did-you-mean."""
    if name not in DETECTORS:
        close = difflib.get_close_matches(name, DETECTORS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(field, name, f"one of {list(DETECTORS)}{hint}")
    return name


def split(d: np.ndarray, detector: str, seed: int = 0) -> np.ndarray:
    """The upper group of a two-group split of d [B] by ``detector`` → bool [B] (True: the
    group of larger values). Every detector splits any batch of two or more distinct values
    into two non-empty groups; a batch of equal values (or of one) is not split (all False)."""
    check_detector(detector)
    d = np.asarray(d, dtype=np.float64)
    if len(d) < 2 or np.ptp(d) == 0:
        return np.zeros(len(d), dtype=bool)
    if detector == "average":
        return d > d.mean()
    if detector == "max-min":
        return d > (d.max() + d.min()) / 2
    if detector == "maxsplit":
        s = np.sort(d)
        i = int(np.argmax(np.diff(s)))  # first of the largest gaps
        return d > s[i]
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=2, n_init=10, random_state=seed).fit(d[:, None])
    upper = int(np.argmax(km.cluster_centers_[:, 0]))
    return km.labels_ == upper


@dataclass(frozen=True)
class Reference:
    """d measured on clean reference batches: its median and spread (standard deviation)."""

    center: float
    spread: float

    @classmethod
    def of(cls, d: np.ndarray) -> Reference:
        d = np.asarray(d, dtype=np.float64)
        return cls(float(np.median(d)), float(d.std(ddof=1)) if len(d) > 1 else 0.0)


def detect(
    d: np.ndarray, detector: str, reference: Reference | None, guard: float, seed: int = 0
) -> np.ndarray:
    """Flagged inputs of a batch → bool [B]: the :func:`split` group whose mean lies farther
    from the reference's median, when the two groups' means are more than ``guard`` ×
    ``reference.spread`` apart (nothing flagged otherwise). Without a reference (or with
    ``guard`` 0) the split is taken as is and the smaller group is flagged (the upper one on
    a tie)."""
    d = np.asarray(d, dtype=np.float64)
    upper = split(d, detector, seed)
    if not upper.any() or upper.all():
        return np.zeros(len(d), dtype=bool)
    hi, lo = d[upper].mean(), d[~upper].mean()
    if reference is None or guard <= 0:
        return upper if upper.sum() <= (~upper).sum() else ~upper
    if hi - lo <= guard * reference.spread:
        return np.zeros(len(d), dtype=bool)
    return upper if abs(hi - reference.center) >= abs(lo - reference.center) else ~upper


def chi2_pvalue(x_T: torch.Tensor) -> np.ndarray:
    """Two-sided p-value of ‖x_T‖² against χ²_d (d = C·H·W) for x_T [B, C, H, W] → [B]."""
    from scipy.stats import chi2

    dof = x_T[0].numel()
    s = x_T.double().flatten(1).pow(2).sum(1).cpu().numpy()
    return np.minimum(1.0, 2.0 * np.minimum(chi2.cdf(s, dof), chi2.sf(s, dof)))


def chi2_flags(x_T: torch.Tensor, alpha: float) -> np.ndarray:
    """Inputs whose norm rejects clean Gaussian noise at level α (two-sided) → bool [B]."""
    if not 0 < alpha < 1:
        raise ConfigError("chi2_alpha", alpha, "a level in (0, 1)")
    return chi2_pvalue(x_T) < alpha


def _labelled(clean: np.ndarray, triggered: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels [N_c + N_t]: 0 clean, 1 triggered; the scores in that order), as float64."""
    clean, triggered = np.asarray(clean, np.float64), np.asarray(triggered, np.float64)
    if len(clean) == 0 or len(triggered) == 0:
        raise ValueError(f"{what} needs at least one clean and one triggered input")
    return np.r_[np.zeros(len(clean)), np.ones(len(triggered))], np.r_[clean, triggered]


def auroc(clean: np.ndarray, triggered: np.ndarray) -> float:
    """How well a score separates triggered inputs [N_t] from clean ones [N_c]: the area under
    the ROC curve of "triggered" against the score, P(s_trig > s_clean) + ½ P(s_trig =
    s_clean) over all pairs (the Mann–Whitney U statistic / (N_c · N_t); scikit-learn's
    ``roc_auc_score``). 0.5 is chance; below 0.5 the triggered inputs score *lower*."""
    from sklearn.metrics import roc_auc_score

    labels, scores = _labelled(clean, triggered, "an AUROC")
    return float(roc_auc_score(labels, scores))


def best_tpr(clean: np.ndarray, triggered: np.ndarray, max_fpr: float) -> float:
    """The largest TPR of any threshold rule "flag s ≥ θ" whose FPR on these clean inputs
    [N_c] is ≤ ``max_fpr``, over the triggered inputs [N_t] (the best point of the ROC curve,
    scikit-learn's ``roc_curve`` with every threshold kept). θ is chosen with the labels,
    which no edge has: the ceiling of every detector that flags this score above a fixed
    threshold."""
    from sklearn.metrics import roc_curve

    labels, scores = _labelled(clean, triggered, "a TPR at an FPR")
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return float(tpr[fpr <= max_fpr].max())  # the first point (θ = ∞: nothing flagged) is 0, 0


def rates(flags: np.ndarray, triggered: np.ndarray) -> dict[str, float]:
    """TPR (flagged share of the triggered inputs) and FPR (of the clean ones); NaN for a
    group that is empty."""
    flags, triggered = np.asarray(flags, bool), np.asarray(triggered, bool)
    tp, pos = float((flags & triggered).sum()), float(triggered.sum())
    fp, neg = float((flags & ~triggered).sum()), float((~triggered).sum())
    return {
        "tpr": tp / pos if pos else float("nan"),
        "fpr": fp / neg if neg else float("nan"),
    }
