"""The partition state a test leaves behind (dead letters, set-aside messages, backoffs,
attempt records): ``partition_worker`` removes what its test added, so a key it parked does
not hold up the next run, and leaves what was there before (a real worker's, on a shared Redis).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .keys import RedisKeys

__all__ = ["Leftovers"]


@dataclass
class _Seen:
    keys: set[bytes] = field(default_factory=set)
    #: Fields of each dead-letter hash (``hash``), members of each backoff schedule (``zset``).
    entries: dict[bytes, tuple[str, set[bytes]]] = field(default_factory=dict)


class Leftovers:
    """Per-message partition state of ``pools`` and ``queues`` under one app namespace."""

    def __init__(self, client: Any, keys: RedisKeys, pools: Iterable[str],
                 queues: Iterable[str]) -> None:
        self.client = client
        self.keys = keys
        self.pools = sorted(set(pools))
        self.queues = sorted(set(queues))
        self._before: _Seen | None = None

    def _patterns(self) -> list[str]:
        patterns = [f"{self.keys.root}attempts:*"]
        for pool in self.pools:
            patterns += [self.keys.dead_letters(pool), self.keys.dead_letter_log(pool),
                         self.keys.skipped_dead_letters(pool)]
            patterns += self.keys.per_key_patterns(pool)
        patterns += [self.keys.backoff_schedule(queue) for queue in self.queues]
        return patterns

    def _entries(self, name: bytes) -> tuple[str, set[bytes]] | None:
        text = name.decode("utf-8", "replace")
        if any(text in (self.keys.dead_letters(pool), self.keys.skipped_dead_letters(pool))
               for pool in self.pools):
            return "hash", set(self.client.hkeys(name))
        if any(text == self.keys.backoff_schedule(queue) for queue in self.queues):
            return "zset", set(self.client.zrange(name, 0, -1))
        return None

    def _scan(self) -> _Seen:
        seen = _Seen()
        for pattern in self._patterns():
            for found in self.client.scan_iter(match=_glob_escape_key(pattern), count=1000):
                name = found if isinstance(found, bytes) else str(found).encode()
                seen.keys.add(name)
                entries = self._entries(name)
                if entries is not None:
                    seen.entries[name] = entries
        return seen

    def before(self) -> None:
        """Note what exists now (before the test)."""
        self._before = self._scan()

    def remove_added(self) -> int:
        """Remove what was added since :meth:`before`; returns how many keys and entries."""
        if self._before is None:
            raise RuntimeError("Leftovers.before() was not called")
        before, now = self._before, self._scan()
        removed = 0
        with self.client.pipeline(transaction=False) as pipe:
            for name in sorted(now.keys - before.keys):
                pipe.delete(name)
                removed += 1
            for name, (kind, entries) in now.entries.items():
                if name not in before.entries:
                    continue  # a new key: deleted whole above
                added = entries - before.entries[name][1]
                if not added:
                    continue
                removed += len(added)
                if kind == "zset":
                    pipe.zrem(name, *added)
                else:
                    pipe.hdel(name, *added)
            pipe.execute()
        return removed


def _glob_escape_key(pattern: str) -> str:
    """``pattern`` with the glob characters of its fixed part escaped (a trailing ``*`` kept)."""
    wild = pattern.endswith(":*")
    fixed = pattern[:-1] if wild else pattern
    escaped = "".join(f"\\{c}" if c in "*?[]\\" else c for c in fixed)
    return escaped + ("*" if wild else "")
