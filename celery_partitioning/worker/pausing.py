"""The pause stage: a partition an operator paused stops between two messages, keeping its lease.

``partitioning pause --partition pool.N`` writes a pause record (``store/pausing.py``). The
process's :class:`PausePoll` reads a pool's pauses at most once per :data:`CHECK` seconds for
all its partitions; a holder that has just taken a partition reads the store before its first
message. Paused, ``between`` does not return: nothing is fetched, the heartbeat keeps the lease
(no standby takes over), the pause is acknowledged for ``status``, and the record is read every
:data:`HOLD_POLL` seconds until ``resume`` or a stop. Paused keys are the parking gate's.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Final

from ..store.broker import unreachable_errors
from ..store.pausing import Pause, PauseStore
from .runtime import PartitionRuntime
from .stage import Stage

__all__ = ["CHECK", "HOLD_POLL", "PartitionPause", "PausePoll"]

logger = logging.getLogger("celery_partitioning.worker")

#: Seconds between two reads of the partition's pause record while it runs.
CHECK: Final = 1.0
#: Seconds between two reads of the record while the partition is paused.
HOLD_POLL: Final = 0.5


class PausePoll:
    """The partition pauses of a process's pools, read at most once per :data:`CHECK` seconds
    per pool (one per process, shared by its pause stages)."""

    def __init__(self, store: PauseStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        #: pool → (when read, monotonic s; its paused partitions).
        self._read: dict[str, tuple[float, dict[int, Pause]]] = {}

    def pause_of(self, pool: str, index: int, max_age: float = CHECK) -> Pause | None:
        """The pause of a partition, from a read of its pool at most ``max_age`` s old."""
        with self._lock:
            now = time.monotonic()
            read_at, pauses = self._read.get(pool, (-math.inf, {}))
            if now - read_at >= max_age:
                pauses = self.store.partition_pauses(pool)
                self._read[pool] = (now, pauses)
        return pauses.get(index)


class PartitionPause(Stage):
    """Holds its partition between two messages while an operator's pause is in force."""

    name = "pause"

    def __init__(self, partition: PartitionRuntime, poll: PausePoll) -> None:
        self.partition = partition
        self.poll = poll
        self.store = poll.store
        #: The next check reads the store, not the poll's last read.
        self.fresh = True

    def recheck(self) -> None:
        """The lease was taken (anew): read the pause record before the first message."""
        self.fresh = True

    def between(self, idle: bool) -> float | None:
        part = self.partition  # the poll reads the store at most once a CHECK
        pause = self.poll.pause_of(part.pool, part.index, 0.0 if self.fresh else CHECK)
        self.fresh = False
        if pause is not None:
            self._hold(pause)
        return None

    def _hold(self, pause: Pause) -> None:
        """Wait, fetching nothing, until the pause is gone or the process stops."""
        part = self.partition
        node = f"{part.hostname}#{part.label}"
        logger.warning("%s paused by %s at %s: no message runs until `partitioning resume "
                       "--partition %s` (the lease is kept)", part.label, pause.by, pause.at,
                       part.label)
        unreachable = unreachable_errors()
        acknowledged = False
        while not part.stopping():
            if not acknowledged:
                try:  # only what status shows: the hold does not depend on it
                    self.store.acknowledge(pause, node)
                    acknowledged = True
                except unreachable as exc:
                    logger.warning("%s store unreachable while paused (%s)", part.label, exc)
            time.sleep(HOLD_POLL)
            part.progress.turned()  # waiting on purpose, not stuck
            try:
                current = self.store.partition_pause(part.pool, part.index)
            except unreachable as exc:
                logger.warning("%s store unreachable while paused (%s)", part.label, exc)
                continue
            if current is None:
                logger.warning("%s resumed: fetching again", part.label)
                return
            if current.at != pause.at:  # resumed and paused again meanwhile
                pause, acknowledged = current, False
