"""Built-in experiment presets (YAML files beside this module)."""

from __future__ import annotations

from importlib import resources
from typing import Any

import yaml

from fedtier.errors import UnknownNameError

DEFAULT_PRESET = "qafed-mnist"


def preset_names() -> list[str]:
    return sorted(
        p.name[:-5] for p in resources.files(__package__).iterdir() if p.name.endswith(".yaml")
    )


def load_preset_dict(name: str) -> dict[str, Any]:
    if name not in preset_names():
        raise UnknownNameError("preset", name, preset_names())
    return yaml.safe_load(resources.files(__package__).joinpath(f"{name}.yaml").read_text())


def describe(name: str) -> str:
    """The preset's one-line description (its first comment line)."""
    text = resources.files(__package__).joinpath(f"{name}.yaml").read_text()
    first = text.splitlines()[0] if text else ""
    return first.lstrip("# ").strip()
