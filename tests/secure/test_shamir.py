"""Shamir sharing against independent references: brute-force enumeration of every
polynomial over a small field, and sympy's modular matrix inverse over the real field."""

import itertools
import random

import pytest
import sympy

from fedtier.secure import shamir


def test_the_field_is_the_smallest_prime_above_2_256():
    assert sympy.isprime(shamir.PRIME)
    assert sympy.nextprime(2**256) == shamir.PRIME
    assert shamir.SHARE_BYTES == 33


@pytest.mark.parametrize("p, t, n", [(13, 3, 5), (11, 2, 4), (7, 4, 6)])
def test_small_field_brute_force(p, t, n):
    """Every polynomial of degree < t over GF(p) through t shares: exactly one, whose
    constant term is what combine returns; through t − 1 shares, exactly one per secret."""
    rng = random.Random(p * 100 + t)
    for _ in range(5):
        secret = rng.randrange(p)
        xs = rng.sample(range(1, p), n)
        shares = shamir.split(secret, xs, t, prime=p, randbelow=rng.randrange)
        for subset in itertools.combinations(shares, t):
            fits = [
                c
                for c in itertools.product(range(p), repeat=t)
                if all(sum(ci * x**i for i, ci in enumerate(c)) % p == y for x, y in subset)
            ]
            assert len(fits) == 1 and fits[0][0] == secret
            assert shamir.combine(list(subset), prime=p) == secret
        few = shares[: t - 1]
        per_secret = {s: 0 for s in range(p)}
        for c in itertools.product(range(p), repeat=t):
            if all(sum(ci * x**i for i, ci in enumerate(c)) % p == y for x, y in few):
                per_secret[c[0]] += 1
        assert set(per_secret.values()) == {1}  # t − 1 shares say nothing about the secret


def test_large_field_against_sympy_vandermonde_solve():
    rng = random.Random(1)
    p, t = shamir.PRIME, 5
    secret = shamir.to_int(bytes(rng.randrange(256) for _ in range(32)))
    xs = list(range(1, 10))
    shares = shamir.split(secret, xs, t)
    for subset in (shares[:t], shares[-t:], shares[::2]):
        v = sympy.Matrix([[pow(x, i, p) for i in range(t)] for x, _ in subset])
        y = sympy.Matrix([s for _, s in subset])
        coeffs = (v.inv_mod(p) * y).applyfunc(lambda e: e % p)
        assert int(coeffs[0]) == secret == shamir.combine(subset)
    # t − 1 shares interpolate to something else (a degree t − 2 fit of a random polynomial)
    assert shamir.combine(shares[: t - 1]) != secret
    assert shamir.to_bytes(shamir.combine(shares[2 : 2 + t])) == shamir.to_bytes(secret)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="threshold"):
        shamir.split(1, [1, 2], 3)
    with pytest.raises(ValueError, match="distinct"):
        shamir.split(1, [1, 1, 2], 2)
    with pytest.raises(ValueError, match=r"\[0, p\)"):
        shamir.split(shamir.PRIME, [1, 2], 2)
    with pytest.raises(ValueError, match="distinct"):
        shamir.combine([(1, 2), (1, 3)])
