"""Compression as upload stages: each client's row is encoded, its bytes counted, and decoded.

A stage runs the codec of :mod:`fedtier.upload.codecs` on every row of ``deltas`` [C, P]
with randomness seeded by (seed, round, client), writes each client's real payload size into
``ctx.payload_bytes`` (read by the cost model and the byte ledger) and returns the decoded
rows, which is what the edge aggregates (SPEC §5: "the edge decodes before aggregating").
Biased codecs (sign, top-k) carry an error-feedback residual per client between the rounds
it is sampled in (Karimireddy et al. 2019; DGC, Lin et al. 2018): p = Δ + e; send C(p);
e ← p − C(p).

Metrics per stage: ``bytes`` (sum over the edge's clients), ``fp32_bytes`` (what fp32 would
have cost), for error feedback ``residual_norm`` (the mean norm of the uploading clients'
residuals) and for ``dynamic`` the chosen bit widths (``bits_sum`` over ``clients``: the mean
bit width between two evaluations is their ratio). Counts sum between evaluations,
``residual_norm`` averages over the calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from fedtier.errors import ConfigError
from fedtier.metrics import MetricSpec, declare_stage_metrics
from fedtier.seeding import torch_generator
from fedtier.upload import codecs
from fedtier.upload.chain import Stage, UploadContext

Encoder = Callable[[torch.Tensor, torch.Generator], bytes]
Decoder = Callable[[bytes, int], torch.Tensor]

declare_stage_metrics(
    {
        "bytes": MetricSpec("Bytes uploaded", "B", higher_is_better=False, reduce="sum"),
        "fp32_bytes": MetricSpec("Bytes at fp32", "B", reduce="sum"),
        "residual_norm": MetricSpec("Mean error-feedback residual norm", reduce="mean"),
        "bits_sum": MetricSpec("Sum of chosen bit widths", "bit", reduce="sum"),
        "clients": MetricSpec("Clients encoded", reduce="sum"),
    }
)


def codec_generator(seed: int, round_: int, client: int) -> torch.Generator:
    """The codec's randomness for one client in one round (apart from its training stream)."""
    return torch_generator(seed, "codec", round_, client)


def codec_stage(encode: Encoder, decode: Decoder, error_feedback: bool = False) -> Stage:
    """An upload stage from an (encode, decode) pair: encode, count the bytes, decode.

    With ``error_feedback`` each client's residual (what was not sent) is added to its next
    upload (EF-SGD); the residuals live in ``ctx.state["residual"]`` (the run's state)."""

    def stage(deltas: torch.Tensor, ctx: UploadContext) -> tuple[torch.Tensor, dict[str, float]]:
        state = ctx.state if ctx.state is not None else {}
        residual: dict[int, torch.Tensor] = state.setdefault("residual", {})
        out = torch.empty_like(deltas)
        total = 0
        for row, client in enumerate(ctx.clients):
            x = deltas[row]
            if error_feedback and client in residual:
                x = x + residual[client]
            payload = encode(x, codec_generator(ctx.seed, ctx.round, client))
            out[row] = decode(payload, x.numel())
            if error_feedback:
                residual[client] = x - out[row]
            ctx.payload_bytes[client] = len(payload)
            total += len(payload)
        metrics = {"bytes": float(total), "fp32_bytes": float(4 * deltas.numel())}
        if error_feedback and residual:
            metrics["residual_norm"] = float(
                sum(float(residual[c].norm()) for c in ctx.clients) / len(ctx.clients)
            )
        return out, metrics

    return stage


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(name, value, f"an integer >= {minimum}")
    return value


def fp32() -> Stage:
    """Uncompressed 32-bit floats: the full-precision (FedDiff-style) baseline."""
    return codec_stage(lambda x, g: codecs.encode_fp32(x), codecs.decode_fp32)


def quantize(levels: int = 256, bucket: int = codecs.BUCKET) -> Stage:
    """Stochastic uniform quantization with a fixed number of levels Q (256 = 8 bits)."""
    levels = _positive_int("upload.quantize.levels", levels, 2)
    bucket = _positive_int("upload.quantize.bucket", bucket)
    return codec_stage(
        lambda x, g: codecs.encode_uniform(x, levels, g, bucket),
        lambda p, d: codecs.decode_uniform(p, d, bucket),
    )


def qsgd(levels: int = 16, bucket: int = 512) -> Stage:
    """QSGD with s levels per bucket (Alistarh et al. 2017)."""
    levels = _positive_int("upload.qsgd.levels", levels)
    bucket = _positive_int("upload.qsgd.bucket", bucket)
    return codec_stage(
        lambda x, g: codecs.encode_qsgd(x, levels, g, bucket),
        lambda p, d: codecs.decode_qsgd(p, d, levels, bucket),
    )


def terngrad(bucket: int = codecs.BUCKET) -> Stage:
    """TernGrad: ternary {−s, 0, s} per bucket, unbiased (Wen et al. 2017)."""
    bucket = _positive_int("upload.terngrad.bucket", bucket)
    return codec_stage(
        lambda x, g: codecs.encode_terngrad(x, g, bucket),
        lambda p, d: codecs.decode_terngrad(p, d, bucket),
    )


def signsgd(error_feedback: bool = True) -> Stage:
    """Scaled signSGD, 1 bit per coordinate, with error feedback (EF-signSGD) by default."""
    if not isinstance(error_feedback, bool):
        raise ConfigError("upload.signsgd.error_feedback", error_feedback, "true or false")
    return codec_stage(lambda x, g: codecs.encode_sign(x), codecs.decode_sign, error_feedback)


def topk(ratio: float = 0.01, error_feedback: bool = True) -> Stage:
    """Top-k sparsification, k = ⌈ratio·P⌉, with error feedback by default (DGC-style)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ConfigError("upload.topk.ratio", ratio, "a fraction in (0, 1]")
    if not isinstance(error_feedback, bool):
        raise ConfigError("upload.topk.error_feedback", error_feedback, "true or false")
    return codec_stage(
        lambda x, g: codecs.encode_topk(x, int(np.ceil(ratio * x.numel()))),
        codecs.decode_topk,
        error_feedback,
    )


def choose_bits(
    x: torch.Tensor,
    target_error: float,
    min_bits: int,
    max_bits: int,
    budget_bits: float | None = None,
    bucket: int = codecs.BUCKET,
) -> int:
    """SS-Diff's dynamic level choice for one device and round.

    The accuracy requirement: the fewest bits b (Q = 2^b levels) whose quantization error bound
    Σ_b d_b Δ_b²/4 (SPEC §5; SS-Diff's Δ_j ≤ δ_j / 2Q_j²) is at most ``target_error``·‖x‖².
    The resource limit: the most bits per coordinate the device can send in its share of the
    deadline (``budget_bits``, from :meth:`fedtier.costs.CostModel.payload_budget_bits`).
    The device takes the accuracy choice capped by its resources, never below ``min_bits``.
    """
    need = max_bits
    energy = float(x.double().pow(2).sum())
    for b in range(min_bits, max_bits + 1):
        if codecs.uniform_error_bound(x, 2**b, bucket) <= target_error * energy:
            need = b
            break
    if budget_bits is not None and math.isfinite(budget_bits):
        header = 32 + 64 * (-(-x.numel() // bucket))
        afford = int((budget_bits - header) // x.numel())
        need = min(need, afford)
    return max(min_bits, need)


def dynamic(
    target_error: float = 0.05, min_bits: int = 2, max_bits: int = 8, bucket: int = codecs.BUCKET
) -> Stage:
    """Dynamic per-device stochastic quantization (SS-Diff): each device picks its level Q_j
    each round by :func:`choose_bits`, then sends :func:`codecs.encode_uniform` with Q_j."""
    if isinstance(target_error, bool) or not isinstance(target_error, (int, float)):
        raise ConfigError("upload.dynamic.target_error", target_error, "a positive number")
    if not target_error > 0:
        raise ConfigError("upload.dynamic.target_error", target_error, "a positive number")
    min_bits = _positive_int("upload.dynamic.min_bits", min_bits, 1)
    max_bits = _positive_int("upload.dynamic.max_bits", max_bits, 1)
    if not min_bits <= max_bits <= 16:
        raise ConfigError("upload.dynamic.max_bits", max_bits, f"{min_bits}..16 (>= min_bits)")
    bucket = _positive_int("upload.dynamic.bucket", bucket)

    def stage(deltas: torch.Tensor, ctx: UploadContext) -> tuple[torch.Tensor, dict[str, float]]:
        budgets: list[float | None] = (
            [float(b) for b in ctx.radio.payload_budget_bits(ctx.clients, deltas.shape[1])]
            if ctx.radio is not None
            else [None] * len(ctx.clients)
        )
        out = torch.empty_like(deltas)
        total, bits_sum = 0, 0
        for row, client in enumerate(ctx.clients):
            bits = choose_bits(deltas[row], target_error, min_bits, max_bits, budgets[row], bucket)
            g = codec_generator(ctx.seed, ctx.round, client)
            payload = codecs.encode_uniform(deltas[row], 2**bits, g, bucket)
            out[row] = codecs.decode_uniform(payload, deltas.shape[1], bucket)
            ctx.payload_bytes[client] = len(payload)
            total += len(payload)
            bits_sum += bits
        return out, {
            "bytes": float(total),
            "fp32_bytes": float(4 * deltas.numel()),
            "bits_sum": float(bits_sum),
            "clients": float(len(ctx.clients)),
        }

    return stage


CODEC_STAGES: dict[str, Callable[..., Stage]] = {
    "fp32": fp32,
    "quantize": quantize,
    "dynamic": dynamic,
    "qsgd": qsgd,
    "terngrad": terngrad,
    "signsgd": signsgd,
    "topk": topk,
}
