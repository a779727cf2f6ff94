"""The executors' log: which executor trains the clients, and fallbacks said once."""

from __future__ import annotations

import logging

log = logging.getLogger("fedtier")
_said: set[str] = set()


def say_once(message: str) -> None:
    """Log ``message`` as a warning the first time it occurs in this process."""
    if message not in _said:
        _said.add(message)
        log.warning(message)
