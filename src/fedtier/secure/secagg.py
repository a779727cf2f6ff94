"""Secure aggregation (Bonawitz et al., CCS 2017; SecAgg+ of Bell et al., CCS 2020).

The edge learns Σ_{u∈U} x_u mod 2^b over the clients U whose masked inputs arrived, and
nothing else about any x_u, even when up to n − t clients drop out. Each client u:

1. **advertise keys** — two X25519 key pairs: (c_u^SK, c_u^PK) to encrypt its shares,
   (s_u^SK, s_u^PK) to agree pairwise masks; uploads both public keys (64 bytes).
2. **share keys** — draws a self-mask seed b_u (32 bytes from the OS), Shamir-shares b_u and
   s_u^SK with threshold t (:mod:`fedtier.secure.shamir`) among its neighbours, and sends each
   neighbour v its two shares encrypted with AES-256-GCM under HKDF(X25519(c_u^SK, c_v^PK)).
3. **masked input** — uploads y_u = x_u + PRG(b_u) + Σ_{v∈N(u)} ±PRG(s_{u,v}) mod 2^b, with
   s_{u,v} = HKDF(X25519(s_u^SK, s_v^PK)) (+ when u < v, − when u > v, so the pair cancels).
4. **unmasking** — the edge announces who uploaded (U) and who dropped (D); each surviving
   client sends its shares of b_u for u ∈ U and of s_u^SK for u ∈ D (never both for one u).
   The edge recovers b_u (u ∈ U) and s_u^SK (u ∈ D) from t shares each, removes the self
   masks and the dropped clients' pairwise masks, and is left with Σ_{u∈U} x_u.

Fewer than t masked inputs, or fewer than t shares for a secret the edge needs, aborts the
protocol: the edge learns nothing (Bonawitz et al. §4: the server aborts when |U_3| < t).

Neighbours: the complete graph (SecAgg) or SecAgg+'s random k-regular Harary graph (each
client's neighbours are the k/2 before and after it on a random cycle), which cuts the
shares and masks per client from n − 1 to k.

The mask expansion is AES-256 in counter mode keyed by the 32-byte agreed (or self-mask)
seed, from ``cryptography``: a PRG whose output cannot be told from uniform without the key,
which is what hides x_u. (numpy's PCG64 is not a cryptographic PRG — its state can be
recovered from its output — and Flower's SecAgg+ folds the seed to 32 bits for numpy's
RandomState, which leaves a 2^32 search.) Secrets (keys, seeds, Shamir coefficients, AES-GCM
nonces) come from the OS, never from the run's public seed; the sum they unmask is exact,
so a run's numbers stay reproducible.

Threat model as in Bonawitz et al.'s honest-but-curious setting: no signatures or
consistency round (their "active" variant needs a PKI, which a simulation cannot supply).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedtier.secure import shamir

PHASES = ("advertise", "share_keys", "masked_input", "unmask")
ID_BYTES = 4  # a client id on the wire
KEY_BYTES = 32  # an X25519 public key
NONCE_BYTES, TAG_BYTES = 12, 16  # AES-GCM
# the plaintext of an encrypted share pair: sender id, receiver id, share of b_u, share of s_u^SK
SHARE_PLAINTEXT = 2 * ID_BYTES + 2 * shamir.SHARE_BYTES

# ----------------------------------------------------------------------------- primitives


def agree(private: X25519PrivateKey, public: X25519PublicKey, info: bytes) -> bytes:
    """A 32-byte key from X25519 key agreement and HKDF-SHA256 (``info`` separates the
    pairwise-mask key from the share-encryption key of the same two clients)."""
    shared = private.exchange(public)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


MASK_INFO = b"fedtier secagg pairwise mask"
SHARE_INFO = b"fedtier secagg share encryption"


def prg(seed: bytes, length: int, bits: int) -> np.ndarray:
    """``length`` words uniform on [0, 2^bits) (uint64 [L]): the AES-256-CTR keystream of the
    32-byte ``seed`` read as little-endian uint32 (uint64 above 32 bits), reduced mod 2^bits
    (2^bits divides the word's range, so the reduction stays uniform)."""
    width = 4 if bits <= 32 else 8
    enc = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    raw = enc.update(bytes(width * length))
    words = np.frombuffer(raw, dtype=f"<u{width}").astype(np.uint64)
    return words & np.uint64(modulus(bits) - 1)


MAX_BITS = 48  # every sum and fixed-point value stays an exact float64 integer


def modulus(bits: int) -> int:
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must lie in [1, {MAX_BITS}], got {bits}")
    return 1 << bits


# ----------------------------------------------------------------------------- fixed point


def encode(values: np.ndarray, clip: float, scale: float, bits: int) -> tuple[np.ndarray, int]:
    """Fixed point mod 2^bits: round(clip(v, −c, c) · scale) in two's complement; returns the
    words (uint64, the shape of ``values``) and how many entries were clipped."""
    v = np.asarray(values, dtype=np.float64)
    clipped = int(np.count_nonzero(np.abs(v) > clip))
    q = np.rint(np.clip(v, -clip, clip) * scale).astype(np.int64)
    return q.astype(np.uint64) & np.uint64(modulus(bits) - 1), clipped


def decode(words: np.ndarray, scale: float, bits: int) -> np.ndarray:
    """The signed value of each word mod 2^bits (≥ 2^(bits−1) is negative), over ``scale``."""
    m = modulus(bits)
    q = np.asarray(words, dtype=np.int64)
    return np.where(q >= m // 2, q - m, q).astype(np.float64) / scale


def max_scale(clip: float, rows: int, bits: int) -> float:
    """The largest whole scale at which the sum of ``rows`` values in [−clip, clip] cannot
    wrap: rows · clip · scale ≤ 2^(bits−1) − 1."""
    return float(np.floor((2 ** (bits - 1) - 1) / (rows * clip)))


# ----------------------------------------------------------------------------- graph


def complete_graph(n: int) -> list[set[int]]:
    """Every client's neighbours are all the others (SecAgg)."""
    return [set(range(n)) - {u} for u in range(n)]


def harary_graph(n: int, k: int, order: Sequence[int]) -> list[set[int]]:
    """SecAgg+'s k-regular graph (Bell et al. 2020 §3): the clients on a cycle in ``order`` (a
    random permutation drawn by the server), each joined to the k/2 before and after it
    (k even; k ≥ n − 1 gives the complete graph)."""
    if k % 2 or k < 2:
        raise ValueError(f"k must be an even number >= 2, got {k}")
    if k >= n - 1:
        return complete_graph(n)
    if sorted(order) != list(range(n)):
        raise ValueError("order must be a permutation of the clients")
    order = [int(u) for u in order]
    pos = {u: i for i, u in enumerate(order)}
    return [
        {order[(pos[u] + d) % n] for d in range(-k // 2, k // 2 + 1) if d != 0} for u in range(n)
    ]


# ----------------------------------------------------------------------------- the protocol


@dataclass
class PhaseCost:
    """One phase's traffic and compute, per client ([C] arrays in row order), and the edge's."""

    up: np.ndarray  # bytes each client sent
    down: np.ndarray  # bytes each client received
    seconds: np.ndarray  # each client's compute (wall clock, this process)
    server_s: float = 0.0  # the edge's compute


@dataclass
class SecAggOutcome:
    """What the edge ends with: the sum of the survivors' inputs, or an abort."""

    total: np.ndarray | None  # [L] uint64: Σ_{u∈U} x_u mod 2^bits; None when aborted
    survivors: list[int]  # U: rows whose masked input arrived (and is in ``total``)
    masked: dict[int, np.ndarray]  # row → y_u [L], what the edge saw of each survivor
    costs: dict[str, PhaseCost]
    threshold: int
    aborted: str | None = None  # why, when the edge could not unmask


@dataclass
class _Client:
    index: int
    c_sk: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    s_sk: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    b: bytes = b""
    inbox: dict[int, bytes] = field(default_factory=dict)  # sender → its encrypted shares
    own: tuple[shamir.Share, shamir.Share] | None = None  # its own shares of b_u, s_u^SK


def _pub(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def secure_sum(
    inputs: np.ndarray,
    threshold: int,
    bits: int = 32,
    graph: list[set[int]] | None = None,
    drop_before_upload: Sequence[int] = (),
    drop_before_unmask: Sequence[int] = (),
) -> SecAggOutcome:
    """Run the four phases for the rows of ``inputs`` [C, L] (words in [0, 2^bits)).

    ``drop_before_upload``: rows that shared their keys but whose masked input never arrives
    (dropped out or missed the deadline): their pairwise masks are removed from the others'
    inputs through their reconstructed s_u^SK. ``drop_before_unmask``: rows whose masked
    input arrived (so it is in the sum) but who send no shares in the unmasking phase.
    ``graph``: each row's neighbours (default complete). Returns the outcome with the bytes
    and compute time of every phase per client.
    """
    x = np.asarray(inputs, dtype=np.uint64)
    n, length = x.shape
    mask = np.uint64(modulus(bits) - 1)
    if bool((x > mask).any()):
        raise ValueError(f"inputs must be words in [0, 2^{bits})")
    graph = graph if graph is not None else complete_graph(n)
    shares_per_client = min(len(nb) for nb in graph) + 1 if n else 0
    if not 1 <= threshold <= max(shares_per_client, 1):
        raise ValueError(
            f"threshold {threshold} must lie in [1, {shares_per_client}] (shares per client)"
        )
    costs = {p: PhaseCost(np.zeros(n), np.zeros(n), np.zeros(n)) for p in PHASES}
    clients = [_Client(u) for u in range(n)]

    # 1. advertise keys: (c_u^PK, s_u^PK) up; each neighbour's id and keys down
    pub: dict[int, tuple[bytes, bytes]] = {}
    for c in clients:
        t0 = time.perf_counter()
        pub[c.index] = (_pub(c.c_sk), _pub(c.s_sk))
        costs["advertise"].seconds[c.index] = time.perf_counter() - t0
        costs["advertise"].up[c.index] = 2 * KEY_BYTES
        costs["advertise"].down[c.index] = len(graph[c.index]) * (ID_BYTES + 2 * KEY_BYTES)

    # 2. share keys: Shamir shares of b_u and s_u^SK, encrypted per neighbour
    for c in clients:
        u = c.index
        t0 = time.perf_counter()
        c.b = os.urandom(32)
        holders = sorted(graph[u] | {u})
        xs = [v + 1 for v in holders]
        b_shares = shamir.split(shamir.to_int(c.b), xs, threshold)
        s_shares = shamir.split(shamir.to_int(c.s_sk.private_bytes_raw()), xs, threshold)
        for v, bs, ss in zip(holders, b_shares, s_shares):
            if v == u:
                c.own = (bs, ss)
                continue
            key = agree(c.c_sk, X25519PublicKey.from_public_bytes(pub[v][0]), SHARE_INFO)
            plain = _pack(u, v, bs[1], ss[1])
            nonce = os.urandom(NONCE_BYTES)
            ct = nonce + AESGCM(key).encrypt(nonce, plain, None)
            clients[v].inbox[u] = ct
            costs["share_keys"].up[u] += ID_BYTES + len(ct)
            costs["share_keys"].down[v] += ID_BYTES + len(ct)
        costs["share_keys"].seconds[u] = time.perf_counter() - t0

    # 3. masked input: y_u = x_u + PRG(b_u) + Σ ±PRG(s_uv) mod 2^bits
    dropped = sorted(set(drop_before_upload))
    survivors = [u for u in range(n) if u not in set(dropped)]
    masked: dict[int, np.ndarray] = {}
    for u in survivors:
        c = clients[u]
        t0 = time.perf_counter()
        y = x[u] + prg(c.b, length, bits)
        for v in graph[u]:
            s_uv = agree(c.s_sk, X25519PublicKey.from_public_bytes(pub[v][1]), MASK_INFO)
            y = y + prg(s_uv, length, bits) if u < v else y - prg(s_uv, length, bits)
            y &= mask
        masked[u] = y & mask
        costs["masked_input"].seconds[u] = time.perf_counter() - t0
        costs["masked_input"].up[u] = -(-length * bits // 8)
    t0 = time.perf_counter()
    total = np.zeros(length, dtype=np.uint64)
    for u in survivors:
        total = (total + masked[u]) & mask
    costs["masked_input"].server_s = time.perf_counter() - t0
    outcome = SecAggOutcome(None, survivors, masked, costs, threshold)
    if len(survivors) < threshold:
        outcome.aborted = (
            f"{len(survivors)} of {n} masked inputs arrived, fewer than the threshold t = "
            f"{threshold}: the edge aborts and learns nothing"
        )
        return outcome

    # 4. unmasking: responders send their shares of b_u (u ∈ U) and s_u^SK (u ∈ D)
    responders = [u for u in survivors if u not in set(drop_before_unmask)]
    b_got: dict[int, list[shamir.Share]] = {u: [] for u in survivors}
    s_got: dict[int, list[shamir.Share]] = {u: [] for u in dropped}
    announced = ID_BYTES * (len(survivors) + len(dropped))
    for v in responders:
        c = clients[v]
        t0 = time.perf_counter()
        assert c.own is not None
        sent = 0
        for u in sorted(graph[v] | {v}):
            if u == v:
                b_share = c.own[0]
                s_share = c.own[1]
            else:
                key = agree(c.c_sk, X25519PublicKey.from_public_bytes(pub[u][0]), SHARE_INFO)
                ct = c.inbox[u]
                src, dst, yb, ys = _unpack(
                    AESGCM(key).decrypt(ct[:NONCE_BYTES], ct[NONCE_BYTES:], None)
                )
                if (src, dst) != (u, v):
                    raise ValueError(f"client {v} got a share pair from {src} for {dst}")
                b_share, s_share = (v + 1, yb), (v + 1, ys)
            if u in b_got:
                b_got[u].append(b_share)
                sent += 1
            elif u in s_got:
                s_got[u].append(s_share)
                sent += 1
        costs["unmask"].seconds[v] = time.perf_counter() - t0
        costs["unmask"].down[v] = announced
        costs["unmask"].up[v] = sent * (ID_BYTES + shamir.SHARE_BYTES)

    t0 = time.perf_counter()
    short = [(u, "b") for u, s in b_got.items() if len(s) < threshold]
    short += [(u, "s") for u, s in s_got.items() if len(s) < threshold]
    if short:
        u, what = short[0]
        got = len(b_got[u]) if what == "b" else len(s_got[u])
        outcome.aborted = (
            f"only {got} shares of client row {u}'s "
            f"{'self-mask seed' if what == 'b' else 'mask key'} reached the edge, fewer than "
            f"the threshold t = {threshold}: the edge aborts and learns nothing"
        )
        costs["unmask"].server_s = time.perf_counter() - t0
        return outcome
    for u in survivors:
        b_u = shamir.to_bytes(shamir.combine(b_got[u][:threshold]))
        total = (total - prg(b_u, length, bits)) & mask
    for u in dropped:
        sk_u = X25519PrivateKey.from_private_bytes(
            shamir.to_bytes(shamir.combine(s_got[u][:threshold]))
        )
        for v in graph[u]:
            if v in masked:  # y_v carries +PRG(s_vu) if v < u, −PRG(s_vu) if v > u
                s_uv = agree(sk_u, X25519PublicKey.from_public_bytes(pub[v][1]), MASK_INFO)
                p = prg(s_uv, length, bits)
                total = (total - p if v < u else total + p) & mask
    costs["unmask"].server_s = time.perf_counter() - t0
    outcome.total = total
    return outcome


def _pack(u: int, v: int, yb: int, ys: int) -> bytes:
    n = shamir.SHARE_BYTES
    return (
        u.to_bytes(ID_BYTES, "big") + v.to_bytes(ID_BYTES, "big")
        + yb.to_bytes(n, "big") + ys.to_bytes(n, "big")
    )  # fmt: skip


def _unpack(plain: bytes) -> tuple[int, int, int, int]:
    if len(plain) != SHARE_PLAINTEXT:
        raise ValueError("malformed share pair")
    n, i = shamir.SHARE_BYTES, ID_BYTES
    return (
        int.from_bytes(plain[:i], "big"),
        int.from_bytes(plain[i : 2 * i], "big"),
        int.from_bytes(plain[2 * i : 2 * i + n], "big"),
        int.from_bytes(plain[2 * i + n :], "big"),
    )
