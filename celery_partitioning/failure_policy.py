"""What a partitioned task's message that failed for good does to its key (pure).

``park``: the key waits behind the dead letter until an operator replays, skips or discards it.
``skip``: the dead letter is recorded and the key goes on with its next message.
Chosen per task (``on_failure=`` / ``partition_on_failure``), else by the setting
``partitioning_on_failure``.
"""

from __future__ import annotations

from typing import Any, Final

from .errors import PartitionConfigError

__all__ = ["ON_FAILURE_POLICIES", "on_failure_problem", "on_failure_setting"]

ON_FAILURE_POLICIES: Final = ("park", "skip")

_FIX: Final = ('use "park" (the key waits behind its failed message) or "skip" (the failed '
               "message is dead-lettered, the key goes on)")


def on_failure_problem(value: object) -> str | None:
    """Why a task's ``on_failure`` is not a failure policy (None when it is one, or unset)."""
    if value is None or value in ON_FAILURE_POLICIES:
        return None
    return f"on_failure={value!r} is not a failure policy; {_FIX}"


def on_failure_setting(value: Any) -> str:
    """The setting ``partitioning_on_failure``, validated."""
    if value not in ON_FAILURE_POLICIES:
        raise PartitionConfigError(
            f"setting partitioning_on_failure (Django: CELERY_PARTITIONING_ON_FAILURE) is "
            f"{value!r}; {_FIX}")
    return str(value)
