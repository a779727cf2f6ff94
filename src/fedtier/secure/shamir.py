"""Shamir secret sharing over a prime field (Shamir 1979), for SecAgg's key shares.

A secret s ∈ GF(p) is the constant term of a random polynomial f of degree t − 1; share j is
(x_j, f(x_j)) for distinct non-zero x_j. Any t shares determine f, hence s = f(0), by Lagrange
interpolation at 0:

    s = Σ_j y_j · Π_{m ≠ j} x_m / (x_m − x_j)   (mod p)

and any t − 1 shares are consistent with every secret (perfect secrecy). SecAgg shares 32-byte
values (X25519 private keys, self-mask seeds), so the default field is p = 2^256 + 297, the
smallest prime above 2^256: every 32-byte string is a field element and a share's y is 33
bytes. The coefficients come from the operating system's randomness (``secrets``): they are
secret, so they must not be derivable from the run's public seed.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence

PRIME = 2**256 + 297  # smallest prime > 2^256 (checked by sympy.isprime in the tests)
SHARE_BYTES = (PRIME.bit_length() + 7) // 8  # 33: bytes of one y value

Share = tuple[int, int]  # (x, y), x ≠ 0


def split(
    secret: int,
    xs: Sequence[int],
    threshold: int,
    prime: int = PRIME,
    randbelow: Callable[[int], int] = secrets.randbelow,
) -> list[Share]:
    """Shares (x, f(x)) of ``secret`` for each x in ``xs`` (distinct, in [1, p)); any
    ``threshold`` of them recover the secret, fewer reveal nothing."""
    xs = [int(x) for x in xs]
    if not 0 <= secret < prime:
        raise ValueError(f"secret must lie in [0, p), got {secret}")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must lie in [1, {len(xs)}] (the shares)")
    if len(set(xs)) != len(xs) or any(not 0 < x < prime for x in xs):
        raise ValueError("share points must be distinct and in [1, p)")
    coeffs = [secret] + [randbelow(prime) for _ in range(threshold - 1)]
    return [(x, _horner(coeffs, x, prime)) for x in xs]


def combine(shares: Sequence[Share], prime: int = PRIME) -> int:
    """f(0) from shares (x_j, y_j) with distinct x_j: Lagrange interpolation at 0. Given
    at least the threshold's number of shares this is the secret; with fewer it is
    unrelated to it."""
    xs = [x for x, _ in shares]
    if not shares or len(set(xs)) != len(xs):
        raise ValueError("need at least one share, with distinct points")
    total = 0
    for j, (xj, yj) in enumerate(shares):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * xm % prime
                den = den * (xm - xj) % prime
        total = (total + yj * num * pow(den, -1, prime)) % prime
    return total


def _horner(coeffs: Sequence[int], x: int, prime: int) -> int:
    acc = 0
    for c in reversed(coeffs):
        acc = (acc * x + c) % prime
    return acc


def to_int(secret: bytes) -> int:
    """A 32-byte secret as a field element (big-endian)."""
    return int.from_bytes(secret, "big")


def to_bytes(value: int, length: int = 32) -> bytes:
    """The inverse of :func:`to_int` for a recovered secret."""
    return value.to_bytes(length, "big")
