"""How soon Flower retries pulling a message object that is not there yet.

Flower sends a message as its tree first and its objects (one per array) after;
a reader that asks before they arrive retries after 1 s, then 2 s, 4 s... With
apps that start in milliseconds and replies looked for every 0.1 s, that first
retry was most of a fine-tuning round's wait. Flower has no setting for it: its
pull functions take the back-off as arguments, defaulted, so the callers' module
gets a version with other defaults.
"""

from __future__ import annotations

import functools
from types import ModuleType

FIRST_RETRY_SECONDS = 0.02
LONGEST_RETRY_SECONDS = 0.2


def retry_object_pulls_sooner(module: ModuleType, function: str, first: float = FIRST_RETRY_SECONDS,
                              longest: float = LONGEST_RETRY_SECONDS) -> None:
    """Make `module.function` (one of Flower's object pulls, as that module imported it) retry after `first` s."""
    pull = getattr(module, function, None)
    if "initial_backoff" not in (getattr(pull, "__kwdefaults__", None) or {}):
        raise RuntimeError(f"{module.__name__}.{function} is not a Flower object pull with a back-off: "
                           "update protocol.flower_pulls for this Flower version")
    setattr(module, function, functools.partial(pull, initial_backoff=first, backoff_cap=longest))
