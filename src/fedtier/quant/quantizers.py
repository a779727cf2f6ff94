"""Weight quantizers: the QAFed paper's per-tensor quantizer and standard affine ones.

Every quantizer maps a float tensor to a float tensor on the quantization grid
("fake quantization"), so a quantized model is an ordinary model whose parameters take
only 2^b distinct values per tensor (per channel for ``affine-channel``). Bit width 32 means
"no quantization" everywhere in fedtier.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fedtier.errors import UnknownNameError

Quantizer = Callable[[torch.Tensor, int], torch.Tensor]
FULL_PRECISION = 32
_EPS = 1e-12


def paper_quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """QAFed eq. (5)–(6), exactly as written.

    s_b = ((2^{b-1} - 1) - (-2^{b-1})) / (max(w) - min(w));
    Q_b(w) = clip(round(w · s_b), -2^{b-1}, 2^{b-1} - 1) / s_b.

    The scale spans the tensor's range but the grid is centred on zero, so a tensor whose
    range is not centred on zero is clipped hard (e.g. BatchNorm gains near 1 all collapse to
    the largest level). That is part of why plain FedAvg models lose so much in the paper.
    """
    if bits >= FULL_PRECISION:
        return w
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scale = (hi - lo) / (w.max() - w.min()).clamp_min(_EPS)
    return torch.clamp(torch.round(w * scale), lo, hi) / scale


def affine_quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Standard asymmetric (zero-point) per-tensor quantization onto 2^b levels over [min, max]."""
    if bits >= FULL_PRECISION:
        return w
    lo, hi = w.min(), w.max()
    return _affine(w, lo, hi, bits)


def affine_channel_quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric per-output-channel quantization (dimension 0); 0-d/1-d tensors per tensor."""
    if bits >= FULL_PRECISION:
        return w
    if w.dim() < 2:
        return affine_quantize(w, bits)
    flat = w.reshape(w.shape[0], -1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    return _affine(flat, lo, hi, bits).reshape(w.shape)


def _affine(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    levels = 2**bits - 1
    scale = (hi - lo).clamp_min(_EPS) / levels
    zero_point = torch.round(-lo / scale)
    q = torch.clamp(torch.round(w / scale) + zero_point, 0, levels)
    return (q - zero_point) * scale


QUANTIZERS: dict[str, Quantizer] = {
    "paper": paper_quantize,
    "affine": affine_quantize,
    "affine-channel": affine_channel_quantize,
}


def get_quantizer(name: str) -> Quantizer:
    """Look a quantizer up by name: ``paper`` (eq. 5–6), ``affine``, ``affine-channel``."""
    if name not in QUANTIZERS:
        raise UnknownNameError("quantizer", name, QUANTIZERS)
    return QUANTIZERS[name]


class _StraightThrough(torch.autograd.Function):
    # setup_context + generate_vmap_rule: usable under torch.func (grad, vmap), which the
    # vectorised executor trains QAT clients with.
    generate_vmap_rule = True

    @staticmethod
    def forward(w, quantizer, bits):  # type: ignore[override]
        return strided_like(quantizer(w, bits), w)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        pass

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None, None


def strided_like(q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``q`` with the strides of ``w`` (a copy only when they differ).

    A channels-last conv weight with one input channel ([C_out, 1, k, k], the first conv on
    grey images) also counts as contiguous, and elementwise ops return it in contiguous
    strides; a convolution with such a weight then writes its output in NCHW, and every
    later layer of the quantized pass runs the slower NCHW kernels or converts layouts.
    """
    if q.stride() == w.stride():
        return q
    return torch.empty_like(w).copy_(q)


def ste(w: torch.Tensor, quantizer: Quantizer, bits: int) -> torch.Tensor:
    """Straight-through estimator: forward Q_b(w), backward identity (QAFed eq. 5)."""
    if bits >= FULL_PRECISION:
        return w
    return _StraightThrough.apply(w, quantizer, bits)
