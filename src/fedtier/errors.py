"""User-facing errors.

Every mistake a user can make (a bad config value, an unknown name, a missing or unreadable
data file) raises a :class:`FedtierError`. The CLI prints its message and exits with status 2,
never a traceback. Messages name the field or file, the bad value and what is allowed.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FedtierError(Exception):
    """Base class of every error caused by user input."""


class ConfigError(FedtierError):
    """A configuration value is missing, of the wrong type or out of range."""

    def __init__(self, field: str, value: object, allowed: str) -> None:
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"config field '{field}': got {value!r}; allowed: {allowed}")


class DataError(FedtierError):
    """A data set is absent or a data file cannot be read."""


class UnknownNameError(FedtierError):
    """A name (preset, model, data set, rule...) is not registered."""

    def __init__(self, kind: str, name: str, known: Iterable[str]) -> None:
        known = sorted(known)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        super().__init__(f"unknown {kind} '{name}'. Known {kind}s: {', '.join(known)}.{hint}")
        self.kind, self.name, self.known = kind, name, known
