"""Checkpoints and final models in the run directory.

``checkpoint.pt`` holds what a killed run needs to continue exactly: the configuration it
belongs to, the summaries of the arms already finished, and the :class:`RunState` of the arm
in progress (global state, device-kept state, upload stages' state, cost ledger, attack
state, the schedule's queue), with the number of ``metrics.jsonl`` lines it has seen. It is
written after every ``eval.checkpoint_every``-th evaluation and when an arm ends, atomically
(a temporary file renamed over the old one), so a ``kill -9`` at any point leaves either the
previous checkpoint or the new one.

Each finished arm's model is kept as ``models/<arm>.safetensors`` (a plain state dict):

    from safetensors.torch import load_file
    state = load_file("runs/qafed-mnist/models/qafed.safetensors")

or, with the model rebuilt from the run's config, ``fedtier.checkpoint.load_model(run_dir,
arm)``.

Checkpoints are pickles written by fedtier into your own run directory; load only run
directories you trust (as with any ``torch.load`` of a full checkpoint).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedtier.errors import FedtierError

CHECKPOINT = "checkpoint.pt"
FORMAT = 1


def save_checkpoint(out: Path, payload: dict[str, Any]) -> None:
    """Write ``checkpoint.pt`` atomically (temporary file, fsync, rename)."""
    tmp = out / (CHECKPOINT + ".tmp")
    with tmp.open("wb") as f:
        torch.save({"format": FORMAT, **payload}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / CHECKPOINT)


def load_checkpoint(out: Path) -> dict[str, Any] | None:
    """The run directory's checkpoint, or None when the run never reached one."""
    path = out / CHECKPOINT
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise FedtierError(f"{path}: not a readable fedtier checkpoint ({e})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise FedtierError(f"{path}: not a fedtier checkpoint of format {FORMAT}")
    return payload


def model_path(out: Path, arm: str) -> Path:
    """``models/<arm>.safetensors``; characters other than letters, digits, '.', '_' and
    '-' in the arm's name become '_' (``fqbd/none`` → ``fqbd_none``)."""
    return out / "models" / (re.sub(r"[^A-Za-z0-9._-]", "_", arm) + ".safetensors")


def save_model(
    out: Path, arm: str, state: dict[str, torch.Tensor], input_shape: tuple[int, ...], classes: int
) -> Path:
    """Save a model's state dict as ``models/<arm>.safetensors`` (with the data's input shape
    and class count in its metadata, so :func:`load_model` can rebuild the model)."""
    from safetensors.torch import save_file

    path = model_path(out, arm)
    path.parent.mkdir(exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    meta = {"arm": arm, "input_shape": ",".join(map(str, input_shape)), "classes": str(classes)}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def load_model(run_dir: str | Path, arm: str | None = None) -> nn.Module:
    """The final model of ``arm`` (default: the only or the first arm) of a finished run,
    rebuilt from the run's config.yaml and loaded from ``models/<arm>.safetensors``."""
    import yaml
    from safetensors import safe_open
    from safetensors.torch import load_file

    from fedtier.config import from_dict
    from fedtier.models import build_model
    from fedtier.quant.bnstats import add_bit_stats

    out = Path(run_dir)
    config_path = out / "config.yaml"
    if not config_path.is_file():
        raise FedtierError(f"'{out}' is not a fedtier run directory: config.yaml is missing")
    arms = from_dict(yaml.safe_load(config_path.read_text())).arm_configs()
    name = arm if arm is not None else next(iter(arms))
    if name not in arms:
        raise FedtierError(f"run '{out}' has no arm '{name}'; its arms: {', '.join(arms)}")
    path = model_path(out, name)
    if not path.is_file():
        raise FedtierError(f"{path} does not exist (the arm has not finished)")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    state = load_file(str(path))
    cfg = arms[name]
    shape = tuple(int(d) for d in meta["input_shape"].split(","))
    model = build_model(cfg.model.name, shape, int(meta["classes"]), **cfg.model.options)
    # per-precision BatchNorm statistics of QAT (quant.bnstats), as the saved state has them
    add_bit_stats(model, sorted({int(k.rsplit("_q", 1)[1]) for k in state if "_mean_q" in k}))
    model.load_state_dict(state)
    return model.eval()


def load_weights(model: nn.Module, path: Path, field: str = "model.init_from") -> None:
    """Load the state dict in ``path`` (a ``.safetensors`` file: a run's
    ``models/<arm>.safetensors`` or a pretrained model of :mod:`fedtier.pretrain`) into
    ``model`` in place. Every entry must match by name and shape; otherwise (another
    architecture, other model options) a :class:`FedtierError` names ``field``, the file and
    the first difference."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FedtierError(f"{field}: '{path}' does not exist (a .safetensors state dict)")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise FedtierError(f"{field}: '{path}' is not a readable .safetensors file: {e}") from e
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or extra or shapes:
        if shapes:
            k = shapes[0]
            what = (
                f"entry '{k}' has shape {tuple(state[k].shape)}, the model's {tuple(own[k].shape)}"
            )
        elif missing:
            what = f"the model's entry '{missing[0]}' is missing from it"
        else:
            what = f"its entry '{extra[0]}' is not in the model"
        raise FedtierError(
            f"{field}: '{path}' holds another architecture than model '{type(model).__name__}' "
            f"with these options ({len(missing)} entries missing, {len(extra)} unexpected, "
            f"{len(shapes)} of another shape; e.g. {what})"
        )
    model.load_state_dict({k: state[k].to(own[k].dtype) for k in own})
