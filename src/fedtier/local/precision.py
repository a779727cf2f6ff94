"""Mixed precision of client training (``train.precision``).

bf16 autocast runs the forward pass of local training (and so its backward) in bfloat16 on
the matrix units of CPUs that have them (AVX512-BF16, AMX) and of recent GPUs; the master
weights, the optimiser step, the aggregation, the quantizers and the evaluation stay fp32.
``auto`` takes bf16 where the hardware has bf16 units and fp32 elsewhere, saying once why.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import torch

from fedtier.local.messages import say_once

__all__ = ["BF16_CPU_FLAGS", "autocast", "bf16_units", "cpu_flags", "resolve_precision"]

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
"""CPU flags (``/proc/cpuinfo``) of native bf16 arithmetic: AVX512-BF16 and Intel AMX."""


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as ``/proc/cpuinfo`` lists them (empty where it is absent)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def bf16_units(device: torch.device | str = "cpu") -> tuple[bool, str]:
    """(whether ``device`` has bf16 matrix units, the reason in words)."""
    device = torch.device(device)
    if device.type == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return ok, f"the GPU {'supports' if ok else 'does not support'} bf16"
    have = sorted(cpu_flags().intersection(BF16_CPU_FLAGS))
    if have:
        return True, f"the CPU has {' and '.join(have)}"
    return False, f"the CPU has none of {', '.join(BF16_CPU_FLAGS)} (bf16 would be emulated)"


def resolve_precision(wanted: str, device: torch.device | str = "cpu") -> str:
    """The precision client training runs in for ``train.precision`` = ``wanted``
    (fp32, bf16 or auto) on ``device``: auto is bf16 where :func:`bf16_units` finds them."""
    if wanted != "auto":
        return wanted
    ok, why = bf16_units(device)
    if not ok:
        say_once(f"train.precision auto: fp32, because {why}")
    return "bf16" if ok else "fp32"


@contextlib.contextmanager
def autocast(precision: str, device: torch.device | str = "cpu") -> Iterator[None]:
    """bf16 autocast on ``device`` when ``precision`` is bf16; nothing for fp32."""
    if precision != "bf16":
        yield
        return
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        yield
