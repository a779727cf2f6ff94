"""Partitioners: coverage, determinism, skew, shard labels, region scenarios, config errors."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from fedtier.data import partition
from fedtier.data.partition import (
    SCHEMES,
    apply_domain,
    dirichlet,
    feature_related,
    label_related,
    label_related_transforms,
    region_classes,
    shards,
    source_related,
)
from fedtier.errors import ConfigError

LABELS = np.repeat(np.arange(10), 60)  # 600 samples, 10 balanced classes
REGIONS = [4, 6]  # 10 clients over two edges
SOURCES = np.arange(600) % 2  # two sources, each holding every class


def _split(
    scheme: str, seed: int = 0, labels: np.ndarray = LABELS, **kw: object
) -> list[np.ndarray]:
    if scheme == "source":
        kw.setdefault("sources", SOURCES)
    return partition(
        labels, 10, scheme, np.random.default_rng(seed), clients_per_region=REGIONS, **kw
    )  # type: ignore[arg-type]


def _mean_entropy(parts: list[np.ndarray], labels: np.ndarray) -> float:
    ent = []
    for p in parts:
        freq = np.bincount(labels[p], minlength=10) / len(p)
        freq = freq[freq > 0]
        ent.append(-(freq * np.log(freq)).sum())
    return float(np.mean(ent))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_is_a_disjoint_cover(scheme: str) -> None:
    parts = _split(scheme)
    assert len(parts) == 10
    assert all(p.dtype == np.int64 and len(p) > 0 for p in parts)
    joined = np.concatenate(parts)
    assert len(joined) == len(LABELS)
    np.testing.assert_array_equal(np.sort(joined), np.arange(len(LABELS)))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_is_deterministic_for_a_seed(scheme: str) -> None:
    a, b, c = _split(scheme, 7), _split(scheme, 7), _split(scheme, 8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_iid_sizes_differ_by_at_most_one() -> None:
    sizes = [len(p) for p in partition(LABELS[:597], 10, "iid", np.random.default_rng(0))]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    skewed = _mean_entropy(_split("dirichlet", alpha=0.1), LABELS)
    flat = _mean_entropy(_split("dirichlet", alpha=100.0), LABELS)
    assert skewed < flat - 0.5
    assert flat > 0.9 * np.log(10)


@pytest.mark.parametrize("alpha", [0.01, 0.5])
def test_dirichlet_respects_min_size(alpha: float) -> None:
    labels = np.repeat(np.arange(10), 20)
    parts = dirichlet(labels, 50, alpha, np.random.default_rng(1), min_size=3)
    assert min(len(p) for p in parts) >= 3
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(200))


def test_dirichlet_falls_back_when_resampling_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    # The package re-exports the function ``partition``, which hides the module attribute.
    monkeypatch.setattr(importlib.import_module("fedtier.data.partition"), "MAX_DIRICHLET_TRIES", 1)
    labels = np.repeat(np.arange(10), 10)
    parts = dirichlet(labels, 25, 0.001, np.random.default_rng(0), min_size=4)  # exactly 4 each
    assert sorted(len(p) for p in parts) == [4] * 25
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(100))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_shards_give_at_most_k_labels_per_client(k: int) -> None:
    parts = shards(LABELS, 20, k, np.random.default_rng(0))  # shard size 30 / k divides 60
    assert all(len(np.unique(LABELS[p])) <= k for p in parts)
    assert sorted({len(p) for p in parts}) == [600 // 20]


def test_feature_related_regions_hold_disjoint_label_groups() -> None:
    parts = feature_related(LABELS, REGIONS, np.random.default_rng(0))
    first = set(np.unique(LABELS[np.concatenate(parts[:4])]).tolist())
    second = set(np.unique(LABELS[np.concatenate(parts[4:])]).tolist())
    assert first == {0, 1, 2, 3, 4}
    assert second == {5, 6, 7, 8, 9}


def test_label_related_is_iid_with_a_region_per_client() -> None:
    parts, region = label_related(LABELS, REGIONS, np.random.default_rng(0))
    np.testing.assert_array_equal(region, [0] * 4 + [1] * 6)
    assert all(len(np.unique(LABELS[p])) >= 5 for p in parts)


def test_domains_are_distinct_shape_preserving_transforms() -> None:
    x = torch.randn(3, 2, 5, 5)
    assert apply_domain(x, 0) is x
    assert torch.equal(apply_domain(x, 1), -x)
    assert torch.equal(apply_domain(x, 2), torch.rot90(x, 1, dims=(2, 3)))
    views = [t(x) for t in label_related_transforms(10)]
    assert all(v.shape == x.shape for v in views)
    assert all(not torch.allclose(views[i], views[j]) for i in range(10) for j in range(i))


def test_quarter_turn_domain_needs_square_images() -> None:
    with pytest.raises(ConfigError, match="square"):
        apply_domain(torch.zeros(1, 1, 4, 6), 2)
    assert apply_domain(torch.zeros(1, 1, 4, 6), 4).shape == (1, 1, 4, 6)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"scheme": "pathological"}, "data.partition"),
        ({"scheme": "dirichlet", "alpha": 0.0}, "data.alpha"),
        ({"scheme": "dirichlet", "alpha": -1.0}, "data.alpha"),
        ({"scheme": "dirichlet", "alpha": float("nan")}, "data.alpha"),
        ({"scheme": "dirichlet", "min_size": 61}, "data.min_size"),
        ({"scheme": "shards", "shards_per_client": 61}, "data.shards_per_client"),
        ({"scheme": "shards", "shards_per_client": 0}, "data.shards_per_client"),
        ({"scheme": "iid", "num_clients": 601}, "topology.clients"),
        ({"scheme": "iid", "num_clients": 0}, "topology.clients"),
        ({"scheme": "feature", "clients_per_region": None}, "data.partition"),
        ({"scheme": "feature", "clients_per_region": [5, 4]}, "topology.clients"),
        ({"scheme": "feature", "clients_per_region": [1] * 10 + [0]}, "topology.edges"),
        (
            {"scheme": "feature", "num_clients": 11, "clients_per_region": [1] * 11},
            "topology.edges",
        ),
        ({"scheme": "label", "clients_per_region": [10, 0]}, "topology.edges"),
        ({"scheme": "source"}, "data.partition"),  # a data set without sources
        ({"scheme": "source", "sources": np.arange(600) % 3}, "topology.edges"),
        ({"scheme": "source", "sources": SOURCES * 2}, "topology.edges"),  # ids 0, 2
        ({"scheme": "source", "sources": np.minimum(np.arange(600), 1)}, "topology.clients"),
    ],
)
def test_bad_parameters_name_the_config_field(kwargs: dict, field: str) -> None:
    args = {"num_clients": 10, "clients_per_region": REGIONS, **kwargs}
    with pytest.raises(ConfigError) as err:
        partition(
            LABELS, args.pop("num_clients"), args.pop("scheme"), np.random.default_rng(0), **args
        )
    assert err.value.field == field
    assert field in str(err.value)


def test_region_classes_are_the_feature_split_groups() -> None:
    assert region_classes(LABELS, 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    parts = feature_related(LABELS, [1, 1, 1], np.random.default_rng(0))
    for part, group in zip(parts, region_classes(LABELS, 3)):
        assert sorted(set(LABELS[part].tolist())) == group


def test_source_related_gives_region_k_only_source_k() -> None:
    sources = np.random.default_rng(1).integers(0, 3, size=600)
    parts = partition(
        LABELS, 7, "source", np.random.default_rng(0), clients_per_region=[2, 3, 2], sources=sources
    )
    region = np.repeat([0, 1, 2], [2, 3, 2])
    for r in range(3):
        mine = [p for p, k in zip(parts, region) if k == r]
        assert all((sources[p] == r).all() for p in mine)
        np.testing.assert_array_equal(np.sort(np.concatenate(mine)), np.flatnonzero(sources == r))
        sizes = [len(p) for p in mine]
        assert max(sizes) - min(sizes) <= 1  # IID within the region
    again = source_related(sources, [2, 3, 2], np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_feature_region_with_too_few_samples_is_a_config_error() -> None:
    labels = np.array([0, 0, 0, 1])
    with pytest.raises(ConfigError, match=r"classes \[1\]"):
        feature_related(labels, [1, 2], np.random.default_rng(0))
