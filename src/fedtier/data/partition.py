"""Splitting a training set over clients (SPEC §1, "Data partitions").

Every partitioner is a pure function of the labels ``[N]`` and a ``np.random.Generator``; it
returns one sorted int64 index array per client. The arrays are disjoint and together cover
every sample exactly once. Bad parameters raise :class:`~fedtier.errors.ConfigError` naming
the config field (``data.alpha``, ``data.shards_per_client``, ``topology.clients``...).

Region-level scenarios (seed 001) number clients region by region: region 0's clients come
first, then region 1's, and so on, matching ``clients_per_region``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import torch

from fedtier.errors import ConfigError

SCHEMES = ("iid", "dirichlet", "shards", "feature", "label", "source")
MAX_DIRICHLET_TRIES = 100  # resamples before the Dirichlet split tops up small clients by hand


def partition(
    labels: np.ndarray,
    num_clients: int,
    scheme: str,
    rng: np.random.Generator,
    *,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    clients_per_region: Sequence[int] | None = None,
    min_size: int = 2,
    sources: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Split samples with ``labels`` ``[N]`` over ``num_clients`` clients by ``scheme``.

    ``scheme`` is one of :data:`SCHEMES`; ``alpha`` and ``min_size`` apply to ``dirichlet``,
    ``shards_per_client`` to ``shards``, and ``clients_per_region`` (summing to
    ``num_clients``) to the region-level ``feature``, ``label`` and ``source`` schemes; the
    others ignore it. ``sources`` ``[N]`` (each sample's source id, ``ArrayDataset.source``)
    is needed by ``source`` only.
    """
    labels = np.asarray(labels)
    _check_clients(num_clients, len(labels))
    if scheme == "iid":
        return iid(labels, num_clients, rng)
    if scheme == "dirichlet":
        return dirichlet(labels, num_clients, alpha, rng, min_size)
    if scheme == "shards":
        return shards(labels, num_clients, shards_per_client, rng)
    if scheme not in ("feature", "label", "source"):
        raise ConfigError("data.partition", scheme, "one of " + ", ".join(SCHEMES))
    if clients_per_region is None:
        raise ConfigError(
            "data.partition",
            scheme,
            "region-level schemes need clients_per_region (clients of each edge)",
        )
    if sum(clients_per_region) != num_clients:
        raise ConfigError(
            "topology.clients",
            num_clients,
            f"the total of clients_per_region {list(clients_per_region)}",
        )
    if scheme == "feature":
        return feature_related(labels, clients_per_region, rng)
    if scheme == "source":
        if sources is None:
            raise ConfigError(
                "data.partition",
                scheme,
                "a data set whose samples carry a source id (multisource-mnist); "
                "otherwise 'label' (one transformed view per region)",
            )
        return source_related(np.asarray(sources), clients_per_region, rng)
    return label_related(labels, clients_per_region, rng)[0]


def iid(labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Uniformly random split into ``num_clients`` parts whose sizes differ by at most one."""
    _check_clients(num_clients, len(labels))
    return [np.sort(p) for p in np.array_split(rng.permutation(len(labels)), num_clients)]


def dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator, min_size: int = 2
) -> list[np.ndarray]:
    """Label skew: each class is spread over clients with proportions drawn from Dir(alpha).

    Smaller ``alpha`` gives more skew. The whole draw is repeated until every client holds at
    least ``min_size`` samples; after :data:`MAX_DIRICHLET_TRIES` failures the last draw is
    kept and short clients receive random samples taken one by one from the largest client.
    """
    n = len(labels)
    _check_clients(num_clients, n)
    if not (
        isinstance(alpha, numbers.Real)
        and not isinstance(alpha, bool)
        and math.isfinite(alpha)
        and alpha > 0
    ):
        raise ConfigError("data.alpha", alpha, "a finite number > 0 (smaller = more label skew)")
    if not (isinstance(min_size, (int, np.integer)) and 0 <= min_size * num_clients <= n):
        raise ConfigError(
            "data.min_size",
            min_size,
            f"an integer >= 0 with min_size * {num_clients} clients <= {n} samples",
        )
    classes = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(MAX_DIRICHLET_TRIES):
        parts = _dirichlet_draw(classes, num_clients, alpha, rng)
        if min(len(p) for p in parts) >= min_size:
            break
    else:
        parts = _top_up(parts, min_size, rng)
    return [np.sort(p) for p in parts]


def shards(
    labels: np.ndarray, num_clients: int, shards_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """McMahan et al.'s pathological split: sort by label, cut into ``num_clients * k`` shards
    of (nearly) equal size, give each client ``k = shards_per_client`` random shards.

    A client holds at most ``k`` labels when every class size is a multiple of the shard size;
    otherwise a shard may straddle two classes, as in the original.
    """
    n = len(labels)
    _check_clients(num_clients, n)
    k = shards_per_client
    if not (isinstance(k, (int, np.integer)) and 1 <= k * num_clients <= n):
        raise ConfigError(
            "data.shards_per_client",
            k,
            f"an integer >= 1 with shards_per_client * {num_clients} clients <= {n} samples",
        )
    order = rng.permutation(n)
    order = order[np.argsort(labels[order], kind="stable")]
    pieces = np.array_split(order, num_clients * k)
    owner = rng.permutation(num_clients * k).reshape(num_clients, k)
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in owner]


def feature_related(
    labels: np.ndarray, clients_per_region: Sequence[int], rng: np.random.Generator
) -> list[np.ndarray]:
    """Seed 001's feature-related scenario: regions hold disjoint label groups.

    The sorted classes are cut into ``len(clients_per_region)`` contiguous groups (0-4 and 5-9
    for two regions and ten classes); region r's samples are split IID over its
    ``clients_per_region[r]`` clients.
    """
    counts = _check_regions(clients_per_region)
    classes = np.unique(labels)
    if len(counts) > len(classes):
        raise ConfigError(
            "topology.edges",
            len(counts),
            f"at most {len(classes)} (one class group per edge) for data.partition 'feature'",
        )
    groups = region_classes(labels, len(counts))
    regions = [(np.flatnonzero(np.isin(labels, g)), f"classes {g}") for g in groups]
    return _iid_within_regions(regions, counts, rng)


def region_classes(labels: np.ndarray, num_regions: int) -> list[list[int]]:
    """The class group of each region in the feature-related scenario: the sorted classes
    present in ``labels`` cut into ``num_regions`` contiguous groups (``np.array_split``; for
    ten classes and three regions: 0-3, 4-6, 7-9). Scores such as
    ``fedtier.generative.region_coverage`` take this list."""
    return [g.tolist() for g in np.array_split(np.unique(labels), num_regions)]


def label_related(
    labels: np.ndarray, clients_per_region: Sequence[int], rng: np.random.Generator
) -> tuple[list[np.ndarray], np.ndarray]:
    """Seed 001's label-related scenario: all labels everywhere, one input domain per region.

    Returns an IID split over all ``sum(clients_per_region)`` clients and ``region_of_client``
    ``[num_clients]``; region r's clients see their inputs through ``apply_domain(x, r)``.
    """
    counts = _check_regions(clients_per_region)
    parts = iid(labels, sum(counts), rng)
    return parts, np.repeat(np.arange(len(counts)), counts)


def source_related(
    sources: np.ndarray, clients_per_region: Sequence[int], rng: np.random.Generator
) -> list[np.ndarray]:
    """Seed 001's label-related scenario on a multi-source data set: region r holds exactly
    the samples of source r (all labels), split IID over its ``clients_per_region[r]`` clients.

    ``sources`` ``[N]`` holds each sample's source id in ``0 .. S - 1``; there must be one
    region per source (``topology.edges == S``).
    """
    counts = _check_regions(clients_per_region)
    ids = np.unique(sources)
    if len(counts) != len(ids) or not np.array_equal(ids, np.arange(len(ids))):
        raise ConfigError(
            "topology.edges",
            len(counts),
            f"{len(ids)} (one edge per source, sources {ids.tolist()}) for data.partition 'source'",
        )
    regions = [(np.flatnonzero(sources == r), f"source {r}") for r in range(len(counts))]
    return _iid_within_regions(regions, counts, rng)


def _iid_within_regions(
    regions: list[tuple[np.ndarray, str]], counts: list[int], rng: np.random.Generator
) -> list[np.ndarray]:
    """Region r's samples ``regions[r][0]`` split IID over its ``counts[r]`` clients, region by
    region; ``regions[r][1]`` names what the region holds, for the error message."""
    parts: list[np.ndarray] = []
    for (members, holding), count in zip(regions, counts):
        if len(members) < count:
            raise ConfigError(
                "topology.clients",
                count,
                f"at most {len(members)} clients for the region holding {holding}",
            )
        parts.extend(np.sort(p) for p in np.array_split(rng.permutation(members), count))
    return parts


def apply_domain(x: torch.Tensor, region: int) -> torch.Tensor:
    """Region ``region``'s view of a normalised image batch ``x`` ``[N, C, H, W]`` (same shape).

    With ``k = region % 8``: rotate by ``90° * (k // 2)`` and, for odd ``k``, invert (negate)
    the normalised image; each further block of eight regions halves the contrast. So region
    0 is the identity (``x`` itself), 1 the inverted image, 2 the image turned by 90°, etc.
    Quarter turns need square images.
    """
    if region < 0:
        raise ValueError(f"region must be >= 0, got {region}")
    k = region % 8
    turns = k // 2
    if turns % 2 and x.shape[-1] != x.shape[-2]:
        raise ConfigError(
            "data.partition",
            "label",
            f"square images (region {region} rotates by 90°), got {x.shape[-2]}x{x.shape[-1]}",
        )
    out = torch.rot90(x, turns, dims=(-2, -1)) if turns else x
    if k % 2:
        out = -out
    return out * 0.5 ** (region // 8) if region >= 8 else out


def label_related_transforms(num_regions: int) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """One input transform per region: element r is ``apply_domain(·, r)``."""
    return [partial(apply_domain, region=r) for r in range(num_regions)]


def _dirichlet_draw(
    classes: list[np.ndarray], num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for members in classes:
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for bucket, chunk in zip(buckets, np.split(rng.permutation(members), cuts)):
            bucket.append(chunk)
    return [np.concatenate(b) for b in buckets]


def _top_up(parts: list[np.ndarray], min_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Move random samples from the largest client to each client below ``min_size``.

    Terminates whenever ``min_size * len(parts)`` does not exceed the total: a short client
    exists only while the largest holds more than ``min_size``.
    """
    parts = list(parts)
    for i in range(len(parts)):
        while len(parts[i]) < min_size:
            donor = int(np.argmax([len(p) for p in parts]))
            j = int(rng.integers(len(parts[donor])))
            parts[i] = np.append(parts[i], parts[donor][j])
            parts[donor] = np.delete(parts[donor], j)
    return parts


def _check_clients(num_clients: int, num_samples: int) -> None:
    if not (isinstance(num_clients, (int, np.integer)) and 1 <= num_clients <= num_samples):
        raise ConfigError(
            "topology.clients",
            num_clients,
            f"an integer in 1..{num_samples} (the number of training samples)",
        )


def _check_regions(clients_per_region: Sequence[int]) -> list[int]:
    counts = [int(c) for c in clients_per_region]
    if not counts or min(counts) < 1:
        raise ConfigError(
            "topology.edges",
            len(counts),
            f"at least one edge, each with at least one client (clients per edge: {counts})",
        )
    return counts
