"""Secure aggregation at the edge (Bonawitz et al. 2017; SecAgg+): X25519 key agreement,
HKDF, AES-CTR mask expansion and AES-GCM share encryption from ``cryptography``; Shamir
sharing over a prime field; the edge's weighted mean from the secure sum alone."""

from fedtier.secure.edge import SecureRound, secure_mean
from fedtier.secure.secagg import SecAggOutcome, secure_sum

__all__ = ["SecAggOutcome", "SecureRound", "secure_mean", "secure_sum"]
