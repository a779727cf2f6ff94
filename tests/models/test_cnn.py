"""The CNN's channels-last max pooling gives exactly what ``torch.nn.MaxPool2d`` gives."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from fedtier.models import build_model
from fedtier.models.cnn import MaxPool2d


def tied(shape: tuple[int, ...]) -> torch.Tensor:
    """ReLU outputs (many zero windows) with positive ties planted in some windows."""
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(shape, generator=g))
    even = x[..., : shape[-2] // 4 * 4, : shape[-1] // 2 * 2]  # a view of whole windows
    even[..., 0::4, 0::2] = even[..., 0::4, 1::2]  # horizontal neighbours equal
    even[..., 1::4, 1::2] = even[..., 0::4, 1::2]  # and the row below as well
    return x


@pytest.mark.parametrize("shape", [(5, 16, 28, 28), (3, 32, 14, 14), (2, 4, 7, 9)])
def test_values_and_gradients_equal_torch_max_pool(shape: tuple[int, ...]) -> None:
    x = tied(shape)
    ours, ref = MaxPool2d(2), nn.MaxPool2d(2)
    assert torch.equal(ours(x), ref(x))
    assert ours(x).is_contiguous()  # handed back in the layout it came in
    up = torch.randn(ref(x).shape, generator=torch.Generator().manual_seed(1))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    (ours(xa) * up).sum().backward()
    (ref(xb) * up).sum().backward()
    assert torch.equal(xa.grad, xb.grad)


def test_channels_last_input_and_vmap_take_the_plain_path() -> None:
    x = tied((2, 3, 4, 8, 8))
    nhwc = x[0].contiguous(memory_format=torch.channels_last)
    out = MaxPool2d(2)(nhwc)
    assert torch.equal(out, F.max_pool2d(nhwc, 2))
    assert out.is_contiguous(memory_format=torch.channels_last)
    batched = vmap(grad(lambda t: (MaxPool2d(2)(t) ** 2).sum()))(x)
    reference = vmap(grad(lambda t: (F.max_pool2d(t, 2) ** 2).sum()))(x)
    assert torch.equal(batched, reference)


def test_cnn_bn_training_step_equals_the_torch_pooling_model() -> None:
    """One SGD step of cnn-bn: loss, every gradient and BatchNorm's running statistics equal
    those of the same model with torch's own pooling layers."""
    torch.manual_seed(0)
    model = build_model("cnn-bn", (1, 28, 28), 10)
    ref = copy.deepcopy(model)
    ref.pool1, ref.pool2 = nn.MaxPool2d(2), nn.MaxPool2d(2)
    assert isinstance(model.pool1, MaxPool2d)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g)
    losses = []
    for m in (model, ref):
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for a, b in zip(model.buffers(), ref.buffers()):
        assert torch.equal(a, b)
    model.eval()
    ref.eval()
    with torch.no_grad():
        state = dict(model.named_parameters())
        assert torch.equal(functional_call(model, state, (x,)), ref(x))


def test_cnn_bn_logits_do_not_depend_on_the_evaluation_batch() -> None:
    """The attack presets evaluate 200 test images a pass (eval.batch_size) instead of 1000:
    each image's logits are the same either way, so the metrics are too."""
    torch.manual_seed(0)
    model = build_model("cnn-bn", (1, 28, 28), 10).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    x = torch.randn(1000, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        whole = model(x)
        assert torch.equal(torch.cat([model(x[i : i + 200]) for i in range(0, 1000, 200)]), whole)
