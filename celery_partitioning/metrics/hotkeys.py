"""The recently busiest keys and partitions of a worker process, bounded and decaying.

Each partition worker process counts the messages it finishes per key and per partition;
every ``HALF_LIFE`` seconds the counts halve, so "recent" means roughly the last few
minutes. At most ``MAX_KEYS`` keys per pool are kept (the smallest are dropped), and the
process writes its top ``TOP`` keys per pool to a small JSON file next to prometheus_client's
multiprocess files (``hotkeys_<pid>.json``), which the metrics server merges at each scrape
(:func:`read_snapshots`). A Gauge with a ``key`` label cannot do this in multiprocess mode:
a key that left the top would keep its last value in the files forever.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

__all__ = ["HALF_LIFE", "TOP", "MAX_KEYS", "HotKeys", "read_snapshots", "merge"]

HALF_LIFE: Final = 60.0
TOP: Final = 10
MAX_KEYS: Final = 1000
#: A snapshot older than this is ignored (its process stopped writing: idle or gone).
STALE_AFTER: Final = 600.0
_PREFIX: Final = "hotkeys_"
_K = TypeVar("_K")


@dataclass
class HotKeys:
    """Decaying message counts per (pool, key label) and per (pool, partition index)."""

    directory: Path | None = None
    half_life: float = HALF_LIFE
    keys: dict[str, dict[str, float]] = field(default_factory=dict)
    partitions: dict[str, dict[int, float]] = field(default_factory=dict)
    _decayed_at: float = field(default_factory=time.monotonic)
    _written_at: float = 0.0
    _dirty: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, pool: str, index: int, key: str | None) -> None:
        with self._lock:
            self._decay()
            per_partition = self.partitions.setdefault(pool, {})
            per_partition[index] = per_partition.get(index, 0.0) + 1
            if key is not None:
                per_key = self.keys.setdefault(pool, {})
                per_key[key] = per_key.get(key, 0.0) + 1
                if len(per_key) > MAX_KEYS:
                    for gone in sorted(per_key, key=per_key.__getitem__)[: len(per_key) - MAX_KEYS]:
                        del per_key[gone]
            self._dirty = True

    def _decay(self) -> None:
        now = time.monotonic()
        halvings = int((now - self._decayed_at) // self.half_life)
        if not halvings:
            return
        self._decayed_at += halvings * self.half_life
        factor = 0.5 ** halvings
        for per_key in self.keys.values():
            _halve(per_key, factor)
        for per_partition in self.partitions.values():
            _halve(per_partition, factor)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            self._decay()
            return {"time": time.time(), "pools": {
                pool: {"keys": sorted(self.keys.get(pool, {}).items(), key=lambda kv: -kv[1])[:TOP],
                       "partitions": {str(i): n for i, n in self.partitions.get(pool, {}).items()}}
                for pool in {*self.keys, *self.partitions}}}

    def flush(self, every: float = 1.0) -> None:
        """Write the snapshot file if something changed and ``every`` seconds passed."""
        if self.directory is None or not self._dirty or time.monotonic() - self._written_at < every:
            return
        self._dirty = False
        self._written_at = time.monotonic()
        path = self.directory / f"{_PREFIX}{os.getpid()}.json"
        tmp = path.with_suffix(".tmp")
        with contextlib.suppress(OSError):  # metrics must never stop a partition
            tmp.write_text(json.dumps(self.snapshot()))
            os.replace(tmp, path)


def _halve(table: dict[_K, float], factor: float) -> None:
    for name in list(table):
        table[name] *= factor
        if table[name] < 0.5:
            del table[name]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_snapshots(directory: Path) -> list[dict[str, Any]]:
    """The fresh snapshots of live processes; those of dead processes are removed."""
    found: list[dict[str, Any]] = []
    for path in directory.glob(f"{_PREFIX}*.json"):
        try:
            pid = int(path.stem[len(_PREFIX):])
        except ValueError:
            continue
        if not _alive(pid):
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and time.time() - float(data.get("time", 0)) < STALE_AFTER:
            found.append(data)
    return found


def merge(snapshots: Iterable[dict[str, Any]]) -> tuple[dict[str, list[tuple[str, float]]],
                                                   dict[str, dict[int, float]]]:
    """Per pool: the top ``TOP`` keys over every process, and the recent count per partition."""
    keys: dict[str, dict[str, float]] = {}
    partitions: dict[str, dict[int, float]] = {}
    for snap in snapshots:
        for pool, found in snap.get("pools", {}).items():
            per_key = keys.setdefault(pool, {})
            for key, n in found.get("keys", []):
                per_key[key] = per_key.get(key, 0.0) + float(n)
            per_partition = partitions.setdefault(pool, {})
            for index, n in found.get("partitions", {}).items():
                per_partition[int(index)] = per_partition.get(int(index), 0.0) + float(n)
    top = {pool: sorted(found.items(), key=lambda kv: -kv[1])[:TOP] for pool, found in keys.items()}
    return top, partitions
