"""When each partition's holder last consumed (epoch s): written by its lease heartbeat with
an expiry of a few TTLs, read by ``status`` to call a partition with waiting messages stalled.
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
