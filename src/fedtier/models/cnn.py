"""The small MNIST CNN of FedAvg (McMahan et al., 2017) and its BatchNorm variant.

``cnn``: Conv(C→16, 5×5, pad 2)–ReLU–MaxPool2–Conv(16→32, 5×5, pad 2)–ReLU–MaxPool2–Flatten–
Linear(32·⌊H/4⌋·⌊W/4⌋ → 128)–ReLU–Linear(128 → K); 215,370 parameters for MNIST (1×28×28,
K = 10). ``cnn-bn`` adds BatchNorm2d after each conv and BatchNorm1d after the hidden Linear
(before its ReLU); it is the model of the QAFed MNIST experiments, where BatchNorm is what
makes plain FedAvg collapse under low-bit quantization.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from fedtier.errors import ConfigError
from fedtier.models.options import positive_float, positive_int
from fedtier.models.registry import Shape, register


@register("cnn")
def cnn(input_shape: Shape, num_classes: int, *, width: float = 1, hidden: int = 128) -> nn.Module:
    """The FedAvg CNN; ``width`` scales the 16/32 conv channels, ``hidden`` is the FC width."""
    return _cnn(input_shape, num_classes, width, hidden, batchnorm=False)


@register("cnn-bn")
def cnn_bn(
    input_shape: Shape, num_classes: int, *, width: float = 1, hidden: int = 128
) -> nn.Module:
    """The FedAvg CNN with BatchNorm after both convs and the hidden Linear."""
    return _cnn(input_shape, num_classes, width, hidden, batchnorm=True)


def _cnn(
    input_shape: Shape, num_classes: int, width: float, hidden: int, *, batchnorm: bool
) -> nn.Sequential:
    scale, hidden = positive_float("width", width), positive_int("hidden", hidden)
    channels, height, width_px = input_shape
    if height < 4 or width_px < 4:
        raise ConfigError(
            "input_shape", input_shape, "height and width of at least 4 for model 'cnn'"
        )
    c1, c2 = max(1, round(16 * scale)), max(1, round(32 * scale))
    layers: list[tuple[str, nn.Module]] = [
        *_conv_block(1, channels, c1, batchnorm),
        *_conv_block(2, c1, c2, batchnorm),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(c2 * (height // 4) * (width_px // 4), hidden)),
    ]
    if batchnorm:
        layers.append(("bn3", nn.BatchNorm1d(hidden)))
    layers += [("relu3", nn.ReLU()), ("fc2", nn.Linear(hidden, num_classes))]
    return nn.Sequential(OrderedDict(layers))


def _conv_block(i: int, cin: int, cout: int, batchnorm: bool) -> list[tuple[str, nn.Module]]:
    """conv{i} (5×5, same padding) [bn{i}] relu{i} pool{i}."""
    block: list[tuple[str, nn.Module]] = [(f"conv{i}", nn.Conv2d(cin, cout, 5, padding=2))]
    if batchnorm:
        block.append((f"bn{i}", nn.BatchNorm2d(cout)))
    return [*block, (f"relu{i}", nn.ReLU()), (f"pool{i}", MaxPool2d(2))]


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` whose CPU forward pass on an NCHW batch [N, C, H, W] runs PyTorch's
    channels-last kernel, with the output handed back in NCHW.

    On CPU, PyTorch's NCHW max pooling is far slower than its channels-last kernel (13 vs
    3.6 ms with both layout conversions, for 200 × 16 × 28 × 28 on one thread); in fqbd-mnist
    it was half of every forward pass. A maximum is exact and both kernels pick the same
    argmax (the first in the window), so the values and indices are identical; the backward
    pass is torch's own NCHW one with those indices (:class:`_ChannelsLastMaxPool`), so the
    gradients are too (tests/models/test_cnn.py). Inputs already in channels-last (the
    processes executor's layout for models without BatchNorm), on other devices, and inside
    ``torch.func`` transforms (the vectorised executor) take the plain path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.device.type != "cpu"
            or x.dim() != 4
            or self.return_indices
            or torch._C._functorch.is_functorch_wrapped_tensor(x)
            or x.is_contiguous(memory_format=torch.channels_last)
        ):
            return super().forward(x)
        args = (
            _pair(self.kernel_size),
            _pair(self.stride),
            _pair(self.padding),
            _pair(self.dilation),
            self.ceil_mode,
        )
        if not (torch.is_grad_enabled() and x.requires_grad):
            nhwc = x.contiguous(memory_format=torch.channels_last)
            return F.max_pool2d(nhwc, *args).contiguous()
        out: torch.Tensor = _ChannelsLastMaxPool.apply(x, args)
        return out


class _ChannelsLastMaxPool(torch.autograd.Function):
    """Forward: torch's channels-last max pooling (values and argmax indices back in NCHW);
    backward: torch's NCHW ``max_pool2d_with_indices_backward`` with those indices, i.e.
    exactly the backward pass of ``F.max_pool2d`` on the NCHW input (a channels-last
    gradient would send every later backward kernel down a slow mixed-layout path)."""

    @staticmethod
    def forward(ctx, x, args):  # type: ignore[no-untyped-def, override]
        nhwc = x.contiguous(memory_format=torch.channels_last)
        out, indices = torch.ops.aten.max_pool2d_with_indices(nhwc, *args)
        indices = indices.contiguous()
        ctx.save_for_backward(x, indices)
        ctx.args = args
        return out.contiguous()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def, override]
        x, indices = ctx.saved_tensors
        back = torch.ops.aten.max_pool2d_with_indices_backward(
            grad.contiguous(), x, *ctx.args, indices
        )
        return back, None
