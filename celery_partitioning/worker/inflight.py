"""Messages of a partition let through by its parking stage, until they finish.

The parking stage reads, in the script that lets a message through, what the retry and the
dead letter of that message need later (its raw payload, its attempt record, whether it
belongs to a replay, where it waits until acked): kept here by task id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["InFlight", "InFlightEntry", "MAX_INFLIGHT"]

#: More messages than this passed the gate without finishing: forget the oldest.
MAX_INFLIGHT: Final = 64


@dataclass(frozen=True)
class InFlightEntry:
    """What the gate saw of a message that it let run (for its dead letter, if it fails)."""

    pool: str
    key: str
    raw: str
    #: The task id's in-place retry record (JSON) as the gate read it, None if it had none.
    attempts: str | None = None
    #: False when the gate did not read the attempt record (the retry code reads it itself).
    attempts_read: bool = False
    #: The message belongs to a replay in flight: the store must hear when it is done.
    replaying: bool = True
    #: Where a message fetched from Redis waits until acked (in-transit list, item).
    in_transit: tuple[str, bytes] | None = None


class InFlight:
    """Messages let through by the gate, by task id, until they finish (one per partition)."""

    def __init__(self) -> None:
        self._entries: dict[str, InFlightEntry] = {}

    def put(self, task_id: str, entry: InFlightEntry) -> None:
        while len(self._entries) >= MAX_INFLIGHT:
            self._entries.pop(next(iter(self._entries)))
        self._entries[task_id] = entry

    def get(self, task_id: str) -> InFlightEntry | None:
        return self._entries.get(task_id)

    def pop(self, task_id: str) -> InFlightEntry | None:
        return self._entries.pop(task_id, None)

    def __len__(self) -> int:
        return len(self._entries)
