"""A model's state as one flat vector, split by a filter into uploaded and device-kept parts.

Updates travel and are aggregated as flat float tensors [P] (stacked [C, P] at an edge), so
aggregation rules never see module structure. Which entries are uploaded is decided once by
a filter (FedBN keeps BatchNorm state on the device), not by special cases in the loop.
Integer buffers (BatchNorm's ``num_batches_tracked``) are neither uploaded nor averaged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

StateFilter = Callable[[str, nn.Module], bool]


def upload_everything(name: str, module: nn.Module) -> bool:
    return True


def keep_batchnorm_local(name: str, module: nn.Module) -> bool:
    """FedBN: BatchNorm parameters and statistics stay on the device."""
    return not isinstance(module, nn.modules.batchnorm._BatchNorm)


def all_of(*filters: StateFilter) -> StateFilter:
    """The filter that uploads an entry only when every one of ``filters`` does (a task's
    device-kept groups composed with FedBN, say)."""

    def upload(name: str, module: nn.Module) -> bool:
        return all(f(name, module) for f in filters)

    return upload


@dataclass
class StateLayout:
    """Names, shapes and offsets of the float state entries of a model."""

    names: list[str]
    shapes: list[torch.Size]
    uploaded: list[bool]

    @classmethod
    def of(cls, model: nn.Module, upload: StateFilter = upload_everything) -> StateLayout:
        owner = {}
        for mod_name, mod in model.named_modules():
            for key, _ in list(mod.named_parameters(recurse=False)) + list(
                mod.named_buffers(recurse=False)
            ):
                owner[f"{mod_name}.{key}" if mod_name else key] = mod
        names, shapes, uploaded = [], [], []
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                names.append(name)
                shapes.append(tensor.shape)
                uploaded.append(upload(name, owner[name]))
        return cls(names, shapes, uploaded)

    @property
    def size(self) -> int:
        return sum(s.numel() for s in self.shapes)

    def mask(self) -> torch.Tensor:
        """[P] bool: True where the entry is uploaded."""
        return torch.cat([torch.full((s.numel(),), u) for s, u in zip(self.shapes, self.uploaded)])

    def flatten(self, model: nn.Module) -> torch.Tensor:
        """[P] float32 copy of the model's float state, in layout order."""
        sd = model.state_dict()
        return torch.cat([sd[n].detach().reshape(-1).float().cpu() for n in self.names])

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``flat`` ([..., P]) per entry, shaped [..., *entry shape]."""
        out, offset = {}, 0
        lead = flat.shape[:-1]
        for name, shape in zip(self.names, self.shapes):
            n = shape.numel()
            out[name] = flat[..., offset : offset + n].view(*lead, *shape)
            offset += n
        return out

    @torch.no_grad()
    def load(self, model: nn.Module, flat: torch.Tensor) -> None:
        """Write a [P] vector into the model's float state in place."""
        sd = model.state_dict()
        for name, entry in self.views(flat).items():
            sd[name].copy_(entry)
