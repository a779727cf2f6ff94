"""Validation of model option values; every failure is a :class:`ConfigError` on ``model.<option>``."""

from __future__ import annotations

from collections.abc import Sequence

from fedtier.errors import ConfigError


def positive_int(option: str, value: object) -> int:
    """``value`` as an int ≥ 1 (bools are rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _error(option, value, "a positive integer")
    return value


def positive_float(option: str, value: object) -> float:
    """``value`` as a float > 0 (ints accepted, bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise _error(option, value, "a positive number")
    return float(value)


def probability(option: str, value: object) -> float:
    """``value`` as a float in [0, 1) — a dropout rate."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise _error(option, value, "a number in [0, 1)")
    return float(value)


def positive_ints(option: str, value: object) -> list[int]:
    """``value`` as a list of ints ≥ 1 (possibly empty)."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise _error(option, value, "a list of positive integers")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
        raise _error(option, value, "a list of positive integers")
    return list(value)


def _error(option: str, value: object, allowed: str) -> ConfigError:
    return ConfigError(f"model.{option}", value, allowed)
