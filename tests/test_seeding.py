"""The one seeding helper: streams keyed by (seed, stage, key), never by call order."""

import numpy as np
import pytest
import torch

from fedtier.seeding import LEGACY_TAGS, derive_seed, numpy_rng, seed_words, torch_generator


def test_legacy_streams_equal_the_first_release_derivation():
    # the first release wrote SeedSequence([seed, *key, tag]).generate_state(1, uint64)[0] >> 1
    for stage, key in (("local", (3, 7)), ("codec", (3, 7)), ("ldp", (2, 5)), ("plan", (4,))):
        tag = LEGACY_TAGS[stage]
        words = [11, *key, *(() if tag is None else (tag,))]
        expected = int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> 1)
        assert derive_seed(11, stage, *key) == expected
    a = numpy_rng(5, "partition").integers(0, 1 << 30, 8)
    b = np.random.default_rng([5, 0xDA7A]).integers(0, 1 << 30, 8)
    assert (a == b).all()


def test_streams_differ_by_stage_and_key_and_repeat_exactly():
    x = torch.randn(16, generator=torch_generator(0, "dp-mean", 1, 0, 0))
    assert torch.equal(x, torch.randn(16, generator=torch_generator(0, "dp-mean", 1, 0, 0)))
    others = [
        torch_generator(0, "dp-mean", 2, 0, 0),  # another round
        torch_generator(0, "dp-mean", 1, 1, 0),  # another edge
        torch_generator(0, "dp-mean", 1, 0, 1),  # another edge round
        torch_generator(0, "ldp", 1, 0, 0),  # another stage
        torch_generator(1, "dp-mean", 1, 0, 0),  # another seed
    ]
    for g in others:
        assert not torch.equal(x, torch.randn(16, generator=g))


def test_new_stage_names_get_distinct_tags_and_bad_words_are_refused():
    assert seed_words(0, "gan-noise", 1)[-1] != seed_words(0, "fid", 1)[-1]
    assert seed_words(0, "gan-noise", 1)[-1] not in LEGACY_TAGS.values()
    with pytest.raises(ValueError, match="non-negative"):
        seed_words(0, "local", -1)
