"""The secure-aggregation protocol: exact sums (python integers as the reference), recovery
from every dropout pattern up to n − t, aborts below t, masked uploads indistinguishable from
uniform (scipy's chi-square and KS tests, with a control that they can fail), byte counts
against the message formats."""

import itertools

import numpy as np
import pytest
from scipy import stats

from fedtier.secure import secagg, shamir
from fedtier.secure.secagg import complete_graph, harary_graph, secure_sum


def words(n, length, bits, seed=0):
    return np.random.default_rng(seed).integers(0, 2**bits, size=(n, length), dtype=np.uint64)


def plain_sum(x, rows, bits):
    """Σ over ``rows`` mod 2^bits in Python integers (no numpy wrap-around)."""
    return [sum(int(x[r, j]) for r in rows) % 2**bits for j in range(x.shape[1])]


@pytest.mark.parametrize("bits", [32, 16, 48])
@pytest.mark.parametrize("graph", ["complete", "k-regular"])
def test_unmasked_sum_equals_the_plain_sum_exactly(bits, graph):
    n = 7
    x = words(n, 123, bits)
    g = complete_graph(n) if graph == "complete" else harary_graph(n, 4, [3, 0, 6, 2, 5, 1, 4])
    out = secure_sum(x, threshold=3, bits=bits, graph=g)
    assert out.aborted is None and out.survivors == list(range(n))
    assert out.total.tolist() == plain_sum(x, range(n), bits)
    # each upload alone is far from its input (the masks do not cancel row by row)
    assert all((out.masked[u] != x[u]).mean() > 0.99 for u in range(n))


def test_every_dropout_pattern_up_to_n_minus_t_recovers_the_sum():
    n, t, bits = 5, 3, 32
    x = words(n, 17, bits, seed=1)
    for before in range(n - t + 1):
        for gone in itertools.combinations(range(n), before):
            alive = [u for u in range(n) if u not in gone]
            # and any of the uploaders may go silent before unmasking while t still respond
            for silent in itertools.combinations(alive, len(alive) - t):
                out = secure_sum(x, t, bits, drop_before_upload=gone, drop_before_unmask=silent)
                assert out.aborted is None, (gone, silent)
                assert out.total.tolist() == plain_sum(x, alive, bits), (gone, silent)


def test_k_regular_graph_recovers_dropped_neighbours_masks():
    n, k, t = 9, 4, 3
    order = list(np.random.default_rng(5).permutation(n))
    g = harary_graph(n, k, order)
    x = words(n, 33, 32, seed=2)
    gone = [order[0], order[4]]  # not neighbours of each other: each has t live neighbours
    out = secure_sum(x, t, 32, g, drop_before_upload=gone)
    assert out.total.tolist() == plain_sum(x, [u for u in range(n) if u not in gone], 32)


def test_fewer_than_t_survivors_aborts_with_a_reason():
    x = words(6, 10, 32)
    out = secure_sum(x, 4, drop_before_upload=[0, 1, 2])
    assert out.total is None
    assert "3 of 6 masked inputs arrived, fewer than the threshold t = 4" in out.aborted
    # enough uploads but too few shares at unmasking: also an abort, never a wrong sum
    out = secure_sum(x, 4, drop_before_upload=[0], drop_before_unmask=[1, 2])
    assert out.total is None and "fewer than the threshold t = 4" in out.aborted
    # k-regular: a client whose neighbours all dropped cannot be unmasked
    g = harary_graph(6, 2, list(range(6)))
    out = secure_sum(x, 2, 32, g, drop_before_upload=[0, 2])
    assert out.total is None and "row 1" in out.aborted


def test_masked_uploads_are_indistinguishable_from_uniform():
    """A client whose input is constant (the worst case: zero entropy) uploads words whose
    top bytes and values pass chi-square and KS tests for uniformity; the same tests reject
    a weak mask (only the low 16 bits masked), so they can fail."""
    n, length = 4, 1 << 15
    x = np.full((n, length), 12345, dtype=np.uint64)
    out = secure_sum(x, 2)
    for u in range(n):
        y = out.masked[u]
        top = (y >> np.uint64(24)).astype(np.int64)
        assert stats.chisquare(np.bincount(top, minlength=256)).pvalue > 1e-4
        assert stats.kstest(y / 2.0**32, "uniform").pvalue > 1e-4
        low_bits = np.unpackbits(y.astype("<u4").view(np.uint8)).reshape(-1, 32).mean(0)
        assert np.abs(low_bits - 0.5).max() < 5 * 0.5 / np.sqrt(length)
    weak = x[0] + (secagg.prg(b"k" * 32, length, 32) & np.uint64(0xFFFF))
    top = (weak >> np.uint64(24)).astype(np.int64)
    assert stats.chisquare(np.bincount(top, minlength=256)).pvalue < 1e-10
    assert stats.kstest(weak / 2.0**32, "uniform").pvalue < 1e-10


def test_prg_is_aes_ctr_and_keyed():
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = bytes(range(32))
    ks = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(40))
    assert secagg.prg(key, 10, 32).tolist() == np.frombuffer(ks, "<u4").tolist()
    assert (secagg.prg(key, 10, 12) < 2**12).all()
    wide = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(80))
    assert secagg.prg(key, 10, 48).tolist() == [w % 2**48 for w in np.frombuffer(wide, "<u8")]
    assert not np.array_equal(secagg.prg(key, 10, 32), secagg.prg(bytes(32), 10, 32))


@pytest.mark.parametrize("bits", [32, 48])
def test_fixed_point_sum_is_exact_and_cannot_wrap(bits):
    rng = np.random.default_rng(3)
    n, c = 9, 2.0
    scale = secagg.max_scale(c, n, bits)
    v = rng.uniform(-3, 3, size=(n, 50))
    v[0, :5] = [c, -c, c, -c, c]  # extremes
    enc, clipped = secagg.encode(v, c, scale, bits)
    assert clipped == int((np.abs(v) > c).sum())
    total = (enc.sum(0) & np.uint64(2**bits - 1)).astype(np.uint64)
    ints = [
        sum(round(min(max(float(v[i, j]), -c), c) * scale) for i in range(n)) for j in range(50)
    ]
    assert secagg.decode(total, scale, bits).tolist() == [q / scale for q in ints]
    worst = secagg.encode(np.full((n, 1), -c), c, scale, bits)[0].sum(0) & np.uint64(2**bits - 1)
    assert secagg.decode(worst, scale, bits)[0] == pytest.approx(-n * c, rel=1e-9)  # no wrap


def test_harary_graph_is_k_regular_and_symmetric():
    n, k = 11, 4
    order = list(np.random.default_rng(0).permutation(n))
    g = harary_graph(n, k, order)
    assert all(len(nb) == k and u not in nb for u, nb in enumerate(g))
    assert all(u in g[v] for u, nb in enumerate(g) for v in nb)
    assert harary_graph(5, 4, range(5)) == complete_graph(5)
    with pytest.raises(ValueError, match="even"):
        harary_graph(8, 3, range(8))


def test_bytes_of_every_phase_follow_the_message_formats():
    n, length, bits = 6, 1000, 32
    out = secure_sum(words(n, length, bits), 4, bits, drop_before_upload=[5])
    c = out.costs
    share_msg = secagg.ID_BYTES + secagg.NONCE_BYTES + secagg.SHARE_PLAINTEXT + secagg.TAG_BYTES
    assert secagg.SHARE_PLAINTEXT == 8 + 2 * shamir.SHARE_BYTES
    assert c["advertise"].up.tolist() == [64] * n
    assert c["advertise"].down.tolist() == [(n - 1) * (4 + 64)] * n
    assert c["share_keys"].up.tolist() == [(n - 1) * share_msg] * n
    assert c["share_keys"].down.tolist() == [(n - 1) * share_msg] * n
    assert c["masked_input"].up.tolist() == [length * 4] * (n - 1) + [0]
    # each of the 5 survivors sends a share of b_u for 5 survivors and of s_u^SK for 1 dropped
    assert c["unmask"].up.tolist() == [6 * (4 + 33)] * (n - 1) + [0]
    assert c["unmask"].down.tolist() == [4 * n] * (n - 1) + [0]
