"""Which tensors of a model are quantized, and post-training quantization of a copy.

The grammar follows torchao's ``quantize_(model, config, filter_fn)``: a :class:`QuantSpec`
(quantizer name + which parameters) applied to *a copy*; the live model is never mutated to be
evaluated.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from fedtier.quant.bnstats import bit_buffers, use_bit_stats
from fedtier.quant.quantizers import FULL_PRECISION, Quantizer, get_quantizer, ste


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize and how.

    quantizer: ``paper`` (QAFed eq. 5–6), ``affine`` or ``affine-channel``.
    params: ``all`` quantizes every floating-point parameter tensor (weights, biases and
        BatchNorm affine parameters, layer by layer as the paper writes w_l) — the default,
        and the setting under which a plain FedAvg BatchNorm CNN collapses at 8 bits;
        ``weights`` quantizes only conv/linear weight matrices (tensors of rank ≥ 2).
    """

    quantizer: str = "paper"
    params: str = "all"

    def fn(self) -> Quantizer:
        return get_quantizer(self.quantizer)

    def selects(self, name: str, tensor: torch.Tensor) -> bool:
        if not tensor.is_floating_point():
            return False
        return self.params == "all" or tensor.dim() >= 2


def quantized_parameters(
    params: Mapping[str, torch.Tensor], spec: QuantSpec, bits: int, *, straight_through: bool
) -> dict[str, torch.Tensor]:
    """Q_b applied to the selected tensors of ``params`` (STE-wrapped for training)."""
    if bits >= FULL_PRECISION:
        return dict(params)
    q = spec.fn()
    out = {}
    for name, w in params.items():
        if not spec.selects(name, w):
            out[name] = w
        elif straight_through:
            out[name] = ste(w, q, bits)
        else:
            out[name] = q(w, bits)
    return out


def forward_quantized(
    model: nn.Module, x: torch.Tensor, spec: QuantSpec, bits: int
) -> torch.Tensor:
    """Forward pass with the model's parameters replaced by Q_b(w) under an STE.

    Gradients flow to the full-precision parameters (QAFed's QAT). BatchNorm layers in train
    mode update the running statistics of precision b when the model has them
    (:mod:`fedtier.quant.bnstats`), otherwise the shared ones.
    """
    return quantized_view(model, spec, bits)(x)


class QuantizedView(nn.Module):
    """``model`` as seen at ``bits``: calling it runs the model's forward (any inputs, e.g. a
    denoiser's ``(x, t)``) with its parameters replaced by Q_b(w) under the STE, through
    ``torch.func.functional_call``, and with the per-precision BatchNorm statistics of b
    when the model keeps them (:func:`fedtier.quant.bnstats.bit_buffers`).

    The view reads the model's parameters at call time, so it sees whatever an enclosing
    ``functional_call`` (the vectorised executor) substituted for them.
    """

    def __init__(self, model: nn.Module, spec: QuantSpec, bits: int) -> None:
        super().__init__()
        self.inner = model
        self.spec = spec
        self.bits = bits

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        model = self.inner
        params = quantized_parameters(
            dict(model.named_parameters()), self.spec, self.bits, straight_through=True
        )
        state = {**params, **bit_buffers(model, self.bits)}
        return functional_call(model, state, args, kwargs)


def quantized_view(model: nn.Module, spec: QuantSpec, bits: int) -> nn.Module:
    """The model at ``bits`` for training (:class:`QuantizedView`); the model itself at full
    precision."""
    if bits >= FULL_PRECISION:
        return model
    return QuantizedView(model, spec, bits)


def quantize_copy(model: nn.Module, spec: QuantSpec, bits: int) -> nn.Module:
    """Post-training quantization: a deep copy of ``model`` with Q_b applied to its parameters
    (and, when the model keeps BatchNorm statistics per precision, those of the nearest one)."""
    clone = copy.deepcopy(model)
    if bits >= FULL_PRECISION:
        return clone
    use_bit_stats(clone, bits)
    with torch.no_grad():
        params = dict(clone.named_parameters())
        for name, w in quantized_parameters(params, spec, bits, straight_through=False).items():
            params[name].copy_(w)
    return clone


def distinct_levels(model: nn.Module, spec: QuantSpec) -> Iterable[tuple[str, int]]:
    """(name, number of distinct values) per selected tensor; used by tests and reports."""
    for name, w in model.named_parameters():
        if spec.selects(name, w):
            yield name, int(torch.unique(w.detach()).numel())


def grid(
    w: torch.Tensor, spec: QuantSpec, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w and Q_b(w) as [groups, -1] (one group per tensor, per output channel for
    ``affine-channel``) and each group's grid step Δ = range / (2^b − 1) [groups, 1], which is
    the step of the paper's and of the affine quantizers."""
    q = spec.fn()(w, bits)
    if spec.quantizer == "affine-channel" and w.dim() >= 2:
        g, gq = w.reshape(w.shape[0], -1), q.reshape(w.shape[0], -1)
    else:
        g, gq = w.reshape(1, -1), q.reshape(1, -1)
    span = g.max(dim=1, keepdim=True).values - g.min(dim=1, keepdim=True).values
    return g, gq, span / (2**bits - 1)
