"""BatchNorm running statistics kept per precision during multi-bit QAT.

The paper is silent on BatchNorm. With one set of running statistics, the fp32 pass and the
Q_b passes of eq. (8) all update the same running mean/variance, and the deployed model at
*every* bit width sees statistics of a mixture of differently scaled activations. On MNIST-5k
in FL this collapses the QAT model to ~10% at 8 and 4 bits even though its weights score
95% with batch statistics. Following AdaBits / Any-Precision DNNs ("switchable" BN), each
precision b ∈ B gets its own running statistics, stored as extra buffers
``running_mean_q{b}`` / ``running_var_q{b}`` on each BatchNorm module. They are ordinary
float state, so they travel, are aggregated and are kept on the device exactly like the
fp32 statistics. Deploying at a bit width b' outside B uses the nearest precision's
statistics (ties go to the higher precision).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

_BN = nn.modules.batchnorm._BatchNorm


def _suffix(bits: int) -> str:
    return f"_q{bits}"


def add_bit_stats(model: nn.Module, bits: Iterable[int]) -> None:
    """Give every tracking BatchNorm of ``model`` its own running statistics per bit width."""
    for module in model.modules():
        if isinstance(module, _BN) and module.track_running_stats:
            for b in bits:
                for stat in ("running_mean", "running_var"):
                    if not hasattr(module, stat + _suffix(b)):
                        module.register_buffer(
                            stat + _suffix(b), getattr(module, stat).detach().clone()
                        )


def stat_bits(model: nn.Module) -> list[int]:
    """Bit widths that have their own statistics in ``model`` (empty when none)."""
    for module in model.modules():
        if isinstance(module, _BN):
            return sorted(
                int(n[len("running_mean_q") :])
                for n, _ in module.named_buffers(recurse=False)
                if n.startswith("running_mean_q")
            )
    return []


def nearest_stats(model: nn.Module, bits: int) -> int | None:
    """The precision whose statistics serve deployment at ``bits`` (None = the fp32 ones)."""
    candidates = stat_bits(model)
    if bits >= 32 or not candidates:
        return None
    best = min([*candidates, 32], key=lambda b: (abs(b - bits), -b))
    return None if best == 32 else best


def bit_buffers(model: nn.Module, bits: int) -> dict[str, torch.Tensor]:
    """Buffer substitutions for a forward pass at ``bits``: ``{"<bn>.running_mean": tensor}``.

    The tensors are the module's own per-bit buffers, so a train-mode pass through
    ``functional_call`` updates them in place.
    """
    src = nearest_stats(model, bits)
    if src is None:
        return {}
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, _BN) and hasattr(module, "running_mean" + _suffix(src)):
            prefix = f"{name}." if name else ""
            for stat in ("running_mean", "running_var"):
                out[prefix + stat] = getattr(module, stat + _suffix(src))
    return out


@torch.no_grad()
def use_bit_stats(model: nn.Module, bits: int) -> None:
    """Copy the statistics for ``bits`` into the regular running statistics (for a PTQ copy)."""
    for name, tensor in bit_buffers(model, bits).items():
        model.get_buffer(name).copy_(tensor)
