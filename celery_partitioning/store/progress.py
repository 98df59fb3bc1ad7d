"""When each partition's holder last consumed: written by its heartbeat, read by ``status``.

The key (``RedisKeys.progress``) holds the wall-clock time (epoch seconds) at which the lease
holder's partition thread last took a message off its queue, or started consuming. The lease
heartbeat writes it every TTL/3 with an expiry of a few TTLs, so a partition nobody holds
has none. ``status`` calls a partition *stalled* when its holder has not consumed for longer
than a threshold while its queue holds messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .keys import RedisKeys

__all__ = ["write_progress", "read_progress"]


def write_progress(client: Any, keys: RedisKeys, queue: str, consumed_at: float,
                   expire_ms: int) -> None:
    """Record ``consumed_at`` (epoch s) for ``queue``, expiring after ``expire_ms``."""
    client.set(keys.progress(queue), f"{consumed_at:.3f}", px=max(1, expire_ms))


def read_progress(client: Any, keys: RedisKeys, queues: Sequence[str]) -> dict[str, float | None]:
    """When each queue's holder last consumed (epoch s), None when nothing is recorded."""
    if not queues:
        return {}
    found: dict[str, float | None] = {}
    for queue, raw in zip(queues, client.mget([keys.progress(q) for q in queues]), strict=True):
        try:
            found[queue] = float(raw) if raw is not None else None
        except ValueError:
            found[queue] = None
    return found
