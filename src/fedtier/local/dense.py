"""The dense executor: clients of a Linear-layer stack trained together, the first layer in
sample space.

For a model ``[Flatten]–Linear–act–Linear–…–Linear`` trained with plain SGD (no momentum, no
weight decay) on a loss that is a mean over the batch, a client's first-layer weight after
any number of steps is the start plus a combination of its own samples:

    W₁ᶜ = W₁ − η · Aᶜᵀ Xᶜ,    Aᶜ [n, d₁] = Σ over steps of ∂L/∂(pre-activation) per sample,

since each step adds −η · Σ_i δ_i x_iᵀ over the batch's samples x_i. The first layer's
output on a batch is therefore

    x W₁ᶜᵀ = (x W₁ᵀ) − η · (x Xᶜᵀ) Aᶜ,

the start's output on the client's samples (one matrix product for all clients, once per
block) minus rows of the client's Gram matrix Xᶜ Xᶜᵀ times Aᶜ. No client's [d₁, d_in] block
is read or written during training: each step costs O(batch · n · d₁) per client instead of
O(batch · d_in · d₁), and only the final delta −η · Aᶜᵀ Xᶜ is materialised, once. This pays
when clients hold fewer samples than the first layer has inputs, which is the federated
regime (:func:`sample_space_pays`). The later (small) layers are stacked per client
([C, in, out]) and run as batched matrix products, updated in place.

Same batches as the sequential executor (:func:`fedtier.local.vectorised.block_schedules`),
clients sorted by step count (the active ones are a prefix), short batches padded and masked
out of each client's mean; gradients by autograd on the batched forward pass. The result
equals the sequential executor's to float rounding (tests/local/test_dense.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from fedtier.local.arm import ArmSetup, local_config
from fedtier.local.vectorised import _reuse_freed_memory, block_schedules, sequential_unless

ACTIVATIONS = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Identity,
)
"""Parameter-free elementwise modules allowed between the Linear layers."""


@dataclass(frozen=True)
class DenseStack:
    """A model ``[Flatten]–Linear–(act–Linear)*`` split into its parts."""

    flatten: bool
    linears: list[tuple[str, nn.Linear]]  # (module name, layer)
    activations: list[nn.Module]  # activations[i] follows linears[i]


def dense_stack(model: nn.Module) -> DenseStack | str:
    """The model as a :class:`DenseStack`, or why it is not one."""
    if not isinstance(model, nn.Sequential):
        return "the model is not an nn.Sequential"
    items = list(model.named_children())
    flatten = bool(items) and isinstance(items[0][1], nn.Flatten)
    if flatten:
        f = items[0][1]
        assert isinstance(f, nn.Flatten)
        if (f.start_dim, f.end_dim) != (1, -1):
            return "the model's Flatten does not flatten all but the batch dimension"
        items = items[1:]
    linears: list[tuple[str, nn.Linear]] = []
    activations: list[nn.Module] = []
    for i, (name, module) in enumerate(items):
        if i % 2 == 0 and isinstance(module, nn.Linear):
            linears.append((name, module))
        elif i % 2 == 1 and isinstance(module, ACTIVATIONS):
            activations.append(module)
        else:
            return f"the model is not Linear layers with elementwise activations ({name})"
    if not linears or len(activations) == len(linears):
        return "the model does not end with a Linear layer"
    if any(layer.bias is None for _, layer in linears):
        return "a Linear layer has no bias"
    return DenseStack(flatten, linears, activations)


def sample_space_pays(samples: int, inputs: int, outputs: int, epochs: int) -> bool:
    """Whether a client of ``samples`` samples trains its first layer (inputs → outputs) for
    ``epochs`` epochs with fewer operations in sample space than in weight space.

    Weight space: a forward and a weight-gradient product per sample and epoch,
    2·E·n·d_in·d_out. Sample space: the Gram matrix n²·d_in, a Gram-row product per sample
    and epoch E·n²·d_out, and the final delta n·d_in·d_out.
    """
    n = samples
    weight_space = 2 * epochs * n * inputs * outputs
    sample_space = n * n * inputs + epochs * n * n * outputs + n * inputs * outputs
    return sample_space < weight_space


def not_dense(setup: ArmSetup) -> str | None:
    """Why the dense executor does not apply to ``setup`` (None: it does)."""
    stack = dense_stack(setup.model)
    if isinstance(stack, str):
        return stack
    if not setup.task.plain_cross_entropy:
        return "the task's loss is not plain cross-entropy (QAT, another task or its own update)"
    t = setup.cfg.train
    if t.momentum or t.weight_decay:
        return "local SGD has momentum or weight decay"
    if local_config(setup.cfg).precision != "fp32":
        return "training runs in bf16 (the sample-space algebra is exact in fp32 only)"
    if not bool(setup.upload_mask.all()):
        return "part of the model's state stays on the device"
    first = stack.linears[0][1]
    largest = int(setup.topology.num_samples.max())
    if not sample_space_pays(largest, first.in_features, first.out_features, t.epochs):
        return (
            f"the largest client ({largest} samples) is too large for the first layer's "
            f"{first.in_features} inputs to be trained in sample space"
        )
    return None


def train_dense(setup: ArmSetup, w: torch.Tensor, clients: list[int], step: int) -> torch.Tensor:
    """Train ``clients`` from w together; returns their deltas [C, P] in ``clients`` order."""
    fallback = sequential_unless("dense", setup, w, clients, step)
    if fallback is not None:
        return fallback
    _reuse_freed_memory()
    stack = dense_stack(setup.model)
    assert isinstance(stack, DenseStack), stack
    local = local_config(setup.cfg)
    data, schedules, order, _ = block_schedules(setup, clients, step, local, skip_singletons=False)
    device = next(setup.model.parameters()).device
    lr = local.lr
    count = len(clients)
    xs = [data[i][0].to(device) for i in order]  # block order
    xs = [x.flatten(1) for x in xs] if stack.flatten else xs
    if any(x.dim() != 2 for x in xs):
        raise ValueError("the dense executor needs inputs of shape [n, features] or a Flatten")
    sizes = [len(x) for x in xs]
    size = max(sizes, default=0)
    y = torch.cat([data[i][1] for i in order]).to(device)
    start = setup.layout.views(w.to(device))
    (first_name, _), *rest = stack.linears
    w1, b1 = start[f"{first_name}.weight"], start[f"{first_name}.bias"]
    z0 = F.linear(torch.cat(xs), w1)  # the start's first-layer output on every sample
    # Per client, padded to the largest client: row c·n + j is client c's sample j.
    gram = torch.zeros(count * size, size, device=device)  # Xᶜ Xᶜᵀ
    for j, x in enumerate(xs):
        torch.mm(x, x.t(), out=gram[j * size : j * size + len(x), : len(x)])
    coef = torch.zeros(count * size, z0.shape[1], device=device)  # A: Σ steps ∂L/∂(output)
    bias1 = b1.expand(count, -1).clone()
    weights = [start[f"{n}.weight"].expand(count, -1, -1).clone() for n, _ in rest]
    biases = [start[f"{n}.bias"].expand(count, -1).clone() for n, _ in rest]
    first = torch.tensor([0, *sizes], device=device).cumsum(0)[:-1, None]  # in z0 and y
    slots = torch.arange(count, device=device)[:, None] * size  # in gram and coef
    inplace = any(getattr(act, "inplace", False) for act in stack.activations[:1])
    steps = [len(schedules[i]) for i in order]
    for k in range(steps[0] if steps else 0):
        active = sum(1 for s in steps if s > k)
        batch = [schedules[order[j]][k] for j in range(active)]
        lengths = torch.tensor([b.shape[0] for b in batch])
        length = int(lengths.max())
        mask = (torch.arange(length) < lengths[:, None]).to(z0.dtype).to(device)
        # padding: the client's sample 0, masked out of its mean (zero gradient)
        idx = pad_sequence(batch, batch_first=True).to(device)
        samples = (idx + first[:active]).flatten()
        slot = (idx + slots[:active]).flatten()
        pre = torch.baddbmm(
            z0.index_select(0, samples).view(active, length, -1),
            gram.index_select(0, slot).view(active, length, size),
            coef.view(count, size, -1)[:active],
            alpha=-lr,
        ).add_(bias1[:active, None])
        pre.requires_grad_()
        leaves = [t[:active].detach().requires_grad_() for t in (*weights, *biases)]
        h = pre.clone() if inplace else pre  # an in-place activation must not modify the leaf
        for i, act in enumerate(stack.activations):
            bias, weight = leaves[len(weights) + i], leaves[i]
            # as W hᵀ: the batched products autograd derives from it are the fast ones
            h = torch.bmm(weight, act(h).transpose(1, 2)).transpose(1, 2) + bias[:, None]
        per_sample = F.cross_entropy(
            h.flatten(0, 1), y.index_select(0, samples), reduction="none"
        ).view_as(mask)
        loss = ((per_sample * mask).sum(1) / mask.sum(1)).sum()
        g_pre, *grads = torch.autograd.grad(loss, [pre, *leaves])
        with torch.no_grad():
            coef.index_add_(0, slot, g_pre.flatten(0, 1))
            bias1[:active].sub_(g_pre.sum(1), alpha=lr)
            for tensor, g in zip((*weights, *biases), grads):
                tensor[:active].sub_(g, alpha=lr)
    deltas = torch.empty(count, setup.layout.size, device=device)
    views = setup.layout.views(deltas)
    coef.mul_(-lr)
    for j, (i, x) in enumerate(zip(order, xs)):  # −η Aᶜᵀ Xᶜ, into ``clients`` order
        torch.mm(coef[j * size : j * size + len(x)].t(), x, out=views[first_name + ".weight"][i])
    back = torch.tensor(order, device=device).argsort()
    torch.sub(bias1[back], b1, out=views[f"{first_name}.bias"])
    for (name, _), weight, bias in zip(rest, weights, biases):
        torch.sub(weight[back], start[f"{name}.weight"], out=views[f"{name}.weight"])
        torch.sub(bias[back], start[f"{name}.bias"], out=views[f"{name}.bias"])
    return deltas.cpu()
