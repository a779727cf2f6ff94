"""Compression codecs that really encode: simulate = encode, count the bytes, decode.

Each codec is a pair of pure functions ``encode(x [P], rng, ...) -> bytes`` and
``decode(payload, P, ...) -> x̂ [P]`` (FLSim's channel shape: the codec owns the byte count,
because the count is ``len(payload)`` of the bytes it produced). The receiver knows only P
(the model layout) and the codec's options; everything else (scales, levels, indices) travels
in the payload and is counted.

Codecs (SPEC §5, SS-Diff §"训练过程", survey §compression):

* ``fp32`` — 32-bit floats, the uncompressed baseline.
* ``uniform`` — stochastic uniform quantization with Q levels between each bucket's min and
  max (SS-Diff's L(w)): unbiased, E‖x − x̂‖² ≤ Σ_b d_b Δ_b² / 4 ≤ d·Δ²/4 for spacing Δ.
* ``qsgd`` — QSGD (Alistarh et al. 2017): per-bucket ℓ2 norm, sign and s stochastic levels of
  |x_i|/‖x‖; fixed-width codes (no Elias coding; documented choice).
* ``terngrad`` — TernGrad (Wen et al. 2017): per-bucket max |x|, 2 bits per coordinate for
  {−1, 0, +1}, stochastic and unbiased.
* ``sign`` — scaled sign (EF-signSGD, Karimireddy et al. 2019): (‖x‖₁/d)·sign(x), 1 bit each.
* ``topk`` — the k largest |x_i| as (uint32 index, float32 value) pairs (DGC-style).

``sign`` and ``topk`` are biased; the upload stages in :mod:`fedtier.upload.compress` pair
them with error feedback.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import torch

BUCKET = 1024  # coordinates per scale for uniform/qsgd/terngrad (QSGD uses 512)


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Unsigned integers < 2**bits, ``bits`` each, little-endian bit order → bytes."""
    if bits == 8:
        return values.astype(np.uint8).tobytes()
    if bits == 16:
        return values.astype("<u2").tobytes()
    v = values.astype(np.uint32)
    planes = ((v[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack_bits(payload: bytes | memoryview, count: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` integers of ``bits`` bits each."""
    if bits == 8:
        return np.frombuffer(payload, dtype=np.uint8, count=count).astype(np.int64)
    if bits == 16:
        return np.frombuffer(payload, dtype="<u2", count=count).astype(np.int64)
    raw = np.unpackbits(
        np.frombuffer(payload, dtype=np.uint8), count=count * bits, bitorder="little"
    )
    return raw.reshape(count, bits).astype(np.int64) @ (1 << np.arange(bits, dtype=np.int64))


def packed_size(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def bits_for(levels: int) -> int:
    """⌈log2 Q⌉ bits to index one of Q levels."""
    return max(1, math.ceil(math.log2(levels)))


def _buckets(x: torch.Tensor, bucket: int) -> tuple[torch.Tensor, int]:
    """[P] → [nb, bucket] zero-padded, and P."""
    d = x.numel()
    nb = max(1, -(-d // bucket))
    padded = torch.zeros(nb * bucket, dtype=torch.float32)
    padded[:d] = x.float()
    return padded.view(nb, bucket), d


def _bucket_sizes(d: int, bucket: int) -> torch.Tensor:
    nb = max(1, -(-d // bucket))
    sizes = torch.full((nb,), float(bucket))
    sizes[-1] = d - (nb - 1) * bucket
    return sizes


# --------------------------------------------------------------------------- fp32


def encode_fp32(x: torch.Tensor) -> bytes:
    return x.detach().float().numpy().astype("<f4").tobytes()


def decode_fp32(payload: bytes, d: int) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(payload, dtype="<f4", count=d).copy())


# --------------------------------------------------------------------------- uniform


def uniform_spacing(x: torch.Tensor, levels: int, bucket: int = BUCKET) -> torch.Tensor:
    """Level spacing Δ_b = (max_b − min_b)/(Q − 1) of each bucket [nb]."""
    xb, d = _buckets(x, bucket)
    lo, hi = _bucket_range(xb, d, bucket)
    return (hi - lo) / (levels - 1)


def uniform_error_bound(x: torch.Tensor, levels: int, bucket: int = BUCKET) -> float:
    """SPEC §5's bound on E‖x − x̂‖² for :func:`encode_uniform`: Σ_b d_b Δ_b² / 4."""
    spacing = uniform_spacing(x, levels, bucket)
    return float((_bucket_sizes(x.numel(), bucket) * spacing**2).sum() / 4)


def _bucket_range(xb: torch.Tensor, d: int, bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
    # padding must not widen the last bucket's range
    last = d - (xb.shape[0] - 1) * bucket
    valid = torch.ones_like(xb, dtype=torch.bool)
    valid[-1, last:] = False
    lo = torch.where(valid, xb, torch.full_like(xb, float("inf"))).amin(1)
    hi = torch.where(valid, xb, torch.full_like(xb, float("-inf"))).amax(1)
    return lo, hi


def encode_uniform(
    x: torch.Tensor, levels: int, rng: torch.Generator, bucket: int = BUCKET
) -> bytes:
    """Stochastic uniform quantization with Q = ``levels`` levels per bucket (SS-Diff L(w)).

    Level s of a bucket is lo + s·Δ, Δ = (hi − lo)/(Q − 1); x rounds up to the next level with
    probability (x − u_s)/Δ, so E[x̂] = x. Payload: Q (uint32), then per bucket lo and hi
    (float32), then ⌈log2 Q⌉ bits per coordinate.
    """
    if levels < 2:
        raise ValueError(f"levels must be >= 2, got {levels}")
    xb, d = _buckets(x, bucket)
    lo, hi = _bucket_range(xb, d, bucket)
    spacing = ((hi - lo) / (levels - 1)).unsqueeze(1)
    scaled = torch.where(spacing > 0, (xb - lo.unsqueeze(1)) / spacing, torch.zeros_like(xb))
    floor = scaled.floor().clamp(0, levels - 1)
    up = torch.rand(xb.shape, generator=rng) < (scaled - floor)
    idx = (floor + up.float()).clamp(0, levels - 1).reshape(-1)[:d]
    header = struct.pack("<I", levels) + torch.stack([lo, hi], 1).numpy().astype("<f4").tobytes()
    return header + pack_bits(idx.numpy().astype(np.int64), bits_for(levels))


def decode_uniform(payload: bytes, d: int, bucket: int = BUCKET) -> torch.Tensor:
    (levels,) = struct.unpack_from("<I", payload)
    nb = max(1, -(-d // bucket))
    ranges = np.frombuffer(payload, dtype="<f4", count=2 * nb, offset=4).reshape(nb, 2)
    idx = unpack_bits(memoryview(payload)[4 + 8 * nb :], d, bits_for(levels))
    lo = np.repeat(ranges[:, 0], bucket)[:d].astype(np.float64)
    hi = np.repeat(ranges[:, 1], bucket)[:d].astype(np.float64)
    return torch.from_numpy((lo + idx * (hi - lo) / (levels - 1)).astype(np.float32))


# --------------------------------------------------------------------------- qsgd


def encode_qsgd(x: torch.Tensor, levels: int, rng: torch.Generator, bucket: int = BUCKET) -> bytes:
    """QSGD with s = ``levels`` (Alistarh et al., 2017, eq. of Q_s): per bucket ‖x‖₂ (float32),
    then per coordinate a sign bit and ⌈log2(s+1)⌉ bits for ℓ ∈ {0..s}, where ℓ/s rounds
    |x_i|/‖x‖ stochastically; x̂_i = ‖x‖·sign(x_i)·ℓ/s is unbiased."""
    xb, d = _buckets(x, bucket)
    norms = xb.norm(dim=1, keepdim=True)
    scaled = torch.where(norms > 0, xb.abs() / norms * levels, torch.zeros_like(xb))
    floor = scaled.floor()
    level = floor + (torch.rand(xb.shape, generator=rng) < (scaled - floor)).float()
    code = (level.clamp(0, levels) * 2 + (xb < 0).float()).reshape(-1)[:d]
    return norms.squeeze(1).numpy().astype("<f4").tobytes() + pack_bits(
        code.numpy().astype(np.int64), 1 + bits_for(levels + 1)
    )


def decode_qsgd(payload: bytes, d: int, levels: int, bucket: int = BUCKET) -> torch.Tensor:
    nb = max(1, -(-d // bucket))
    norms = np.frombuffer(payload, dtype="<f4", count=nb)
    code = unpack_bits(memoryview(payload)[4 * nb :], d, 1 + bits_for(levels + 1))
    sign = 1.0 - 2.0 * (code & 1)
    x = np.repeat(norms, bucket)[:d].astype(np.float64) * sign * (code >> 1) / levels
    return torch.from_numpy(x.astype(np.float32))


# --------------------------------------------------------------------------- terngrad


def encode_terngrad(x: torch.Tensor, rng: torch.Generator, bucket: int = BUCKET) -> bytes:
    """TernGrad (Wen et al., 2017): per bucket s = max|x| (float32); each x_i becomes
    s·sign(x_i)·b_i with b_i ~ Bernoulli(|x_i|/s), coded in 2 bits (0, +1, −1): unbiased."""
    xb, d = _buckets(x, bucket)
    scale = xb.abs().amax(1, keepdim=True)
    prob = torch.where(scale > 0, xb.abs() / scale, torch.zeros_like(xb))
    keep = torch.rand(xb.shape, generator=rng) < prob
    code = (keep.long() * torch.where(xb < 0, 2, 1)).reshape(-1)[:d]
    return scale.squeeze(1).numpy().astype("<f4").tobytes() + pack_bits(code.numpy(), 2)


def decode_terngrad(payload: bytes, d: int, bucket: int = BUCKET) -> torch.Tensor:
    nb = max(1, -(-d // bucket))
    scale = np.frombuffer(payload, dtype="<f4", count=nb)
    code = unpack_bits(memoryview(payload)[4 * nb :], d, 2)
    value = np.select([code == 1, code == 2], [1.0, -1.0], 0.0)
    return torch.from_numpy((np.repeat(scale, bucket)[:d] * value).astype(np.float32))


# --------------------------------------------------------------------------- sign


def encode_sign(x: torch.Tensor) -> bytes:
    """Scaled sign (EF-signSGD): the scale ‖x‖₁/d (float32) and one sign bit per coordinate."""
    scale = x.abs().mean()
    return struct.pack("<f", float(scale)) + pack_bits((x < 0).numpy().astype(np.int64), 1)


def decode_sign(payload: bytes, d: int) -> torch.Tensor:
    (scale,) = struct.unpack_from("<f", payload)
    negative = unpack_bits(memoryview(payload)[4:], d, 1)
    return torch.from_numpy((scale * (1.0 - 2.0 * negative)).astype(np.float32))


# --------------------------------------------------------------------------- top-k


def encode_topk(x: torch.Tensor, k: int) -> bytes:
    """The k entries of largest magnitude: k uint32 indices (sorted) then k float32 values."""
    k = max(1, min(k, x.numel()))
    idx = x.abs().topk(k).indices.sort().values
    return idx.numpy().astype("<u4").tobytes() + x[idx].numpy().astype("<f4").tobytes()


def decode_topk(payload: bytes, d: int) -> torch.Tensor:
    k = len(payload) // 8
    idx = np.frombuffer(payload, dtype="<u4", count=k).astype(np.int64)
    values = np.frombuffer(payload, dtype="<f4", count=k, offset=4 * k)
    out = torch.zeros(d)
    out[torch.from_numpy(idx)] = torch.from_numpy(values.copy())
    return out
