"""Every random stream of a run, from one helper: (seed, stage name, round, ids) → generator.

A stream is named by the stage that draws from it (``"local"``, ``"codec"``, ``"dp-mean"``…)
and keyed by where it is used (round, edge, client, edge round…), never by call order, so a
client's noise does not depend on who else was sampled, a resumed run draws exactly what an
uninterrupted one draws, and two stages never share a stream.

The entropy words are ``[seed, *key, tag(stage)]``. The tags of the first release's streams
are kept (``LEGACY_TAGS``) so its numbers stay; any other stage name gets a tag from a CRC-32
of its name. ``numpy_rng(seed, stage, *key)`` equals ``np.random.default_rng(words)``.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

# stage → tag word appended to the key (None: no tag, the local-training stream)
LEGACY_TAGS: dict[str, int | None] = {
    "local": None,  # client training: [seed, round, client]
    "codec": 0xC0DEC,  # stochastic codecs: [seed, round, client, tag]
    "attack": 0xA77,  # malicious clients: [seed, step, client, tag]
    "ldp": 0x1D9,  # local DP noise: [seed, round, client, tag]
    "server-noise": 0x5E,  # server-side noise: [seed, round, tag]
    "dp-mean": 0xD9,  # central DP noise: [seed, round, edge, edge round, tag]
    "partition": 0xDA7A,  # data split: [seed, tag]
    "qcheck": 0x5E7,  # qcheck's clean set: [seed, tag]
    "malicious": 0xBAD,  # which clients are malicious: [seed, tag]
    "async": 0xA5C,  # async dispatch: [seed, tag]
    "gossip": 0x6055,  # gossip peers: [seed, round, tag]
    "topology": 0xE06E,  # device profiles, channel gains: [seed, tag]
    "plan": 0x5A3,  # round plans: [seed, round, tag]
}
# Streams added since (CRC-32 tags): "poisson" (DP arms' client sampling: round, edge),
# "repair" (the cells solver's batch order: step, client), "diffusion-eval" (the diffusion
# task's evaluation noise), "secagg-dropout" (simulated dropouts under secure aggregation:
# round, edge, edge round, client), "secagg-graph" (SecAgg+'s random graph: round, edge, edge
# round). Secure aggregation's keys and seeds are secret and come from the OS, not from here.


def stage_tag(stage: str) -> int | None:
    """The tag word of ``stage``: the legacy one, else CRC-32 of its name."""
    if stage in LEGACY_TAGS:
        return LEGACY_TAGS[stage]
    return zlib.crc32(stage.encode()) | (1 << 32)  # beyond 32 bits: never a legacy tag


def seed_words(seed: int, stage: str, *key: int) -> list[int]:
    """The entropy words of the stream ``stage`` at ``key`` (round, edge, client…)."""
    for k in (seed, *key):
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"seed and key words must be non-negative integers, got {k!r}")
    tag = stage_tag(stage)
    return [int(seed), *(int(k) for k in key), *(() if tag is None else (tag,))]


def derive_seed(seed: int, stage: str, *key: int) -> int:
    """A 63-bit integer seed for the stream (for ``torch.Generator.manual_seed``)."""
    words = seed_words(seed, stage, *key)
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> 1)


def torch_generator(seed: int, stage: str, *key: int) -> torch.Generator:
    """A CPU ``torch.Generator`` for the stream ``stage`` at ``key``."""
    return torch.Generator().manual_seed(derive_seed(seed, stage, *key))


def numpy_rng(seed: int, stage: str, *key: int) -> np.random.Generator:
    """A numpy ``Generator`` for the stream ``stage`` at ``key``."""
    return np.random.default_rng(seed_words(seed, stage, *key))
