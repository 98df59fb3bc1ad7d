"""A partition as a unit with a life cycle, started and stopped at any time on a running process.

``start()``: a thread (``partition.py``) takes the lease (a standby waits), puts back at the
head what a dead predecessor held, then consumes. ``stop()``: no further message starts, the
running one finishes, a message fetched meanwhile goes back to the head, the lease is released
so a standby takes over at once. Both may be called again and again. ``PartitionsStep``
(``hooks.py``) and the in-process worker run their partitions as these units.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Final

from ..store.broker import FETCH_TIMEOUT, unblock
from .partition import PartitionThread
from .runtime import PartitionRuntime

__all__ = ["Partition", "unit_of", "wake"]

logger = logging.getLogger("celery_partitioning.worker")

#: Seconds between two unblocks of one thread's fetch (a stop unblocks it again as long as
#: the thread runs: a fetch sent just after an unblock would wait out ``FETCH_TIMEOUT``).
WAKE_AGAIN: Final = 1.0


class Partition:
    """One partition of a process, started and stopped as a unit."""

    def __init__(self, runtime: PartitionRuntime,
                 thread: Callable[[PartitionRuntime], PartitionThread] = PartitionThread) -> None:
        self.runtime = runtime
        self._new_thread = thread
        #: The thread of the current (or last) run, None before the first start.
        self.thread: PartitionThread | None = None
        self._lock = threading.Lock()

    @property
    def label(self) -> str:
        return self.runtime.label

    @property
    def running(self) -> bool:
        """Its thread is alive (a standby waiting for the lease included)."""
        return self.thread is not None and self.thread.is_alive()

    @property
    def consuming(self) -> bool:
        """It holds what it needs (the lease) and consumes."""
        return self.running and self.thread is not None and self.thread.consuming.is_set()

    def start(self) -> PartitionThread | None:
        """Take the lease (or wait for it), recover, consume; returns the partition's thread,
        None when its process is stopping (a start that waited for a stop must not undo it)."""
        with self._lock:
            if self.runtime.worker is not None and self.runtime.worker.stopping():
                return None
            if self.thread is not None and self.thread.is_alive():
                if not self.runtime.stop_event.is_set():
                    return self.thread
                self.thread.join()  # a stop in progress: let it end first
            self.runtime.stop_event.clear()
            thread = self._new_thread(self.runtime)
            thread.start()
            self.thread = thread
            return thread

    def stop(self, timeout: float | None = None) -> bool:
        """Finish the running message, release the lease; True once the thread has ended
        (False: still running its task after ``timeout`` seconds)."""
        with self._lock:
            self.runtime.stop_event.set()
            thread = self.thread
            if thread is None:
                return True
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                wake([self])
                left = WAKE_AGAIN if deadline is None else deadline - time.monotonic()
                thread.join(max(0.0, min(left, WAKE_AGAIN)))
                if not thread.is_alive() or (deadline is not None and left <= WAKE_AGAIN):
                    return not thread.is_alive()

    def __repr__(self) -> str:
        state = "consuming" if self.consuming else "running" if self.running else "stopped"
        return f"<Partition {self.label} {state}>"


def unit_of(units: list[Partition], pool: str, index: int) -> Partition:
    """Partition ``index`` of ``pool`` among ``units`` (KeyError when not there)."""
    for unit in units:
        if (unit.runtime.pool, unit.runtime.index) == (pool, index):
            return unit
    raise KeyError(f"partition {pool}.{index} is not run in this process")


def wake(units: Sequence[Partition]) -> None:
    """Unblock the Redis fetches of these (stopping) partitions' threads, so they see the stop
    at once; a thread woken less than ``WAKE_AGAIN`` ago is left alone. A failure only costs
    the fetch time-out."""
    now = time.monotonic()
    threads = [unit.thread for unit in units if unit.thread is not None]
    chosen = [thread for thread in threads if thread.is_alive() and thread.fetch_name
              and thread.runtime.broker is not None and now - thread.woken_at >= WAKE_AGAIN]
    if not chosen:
        return
    for thread in chosen:
        thread.woken_at = now
    broker = chosen[0].runtime.broker
    assert broker is not None
    try:
        unblock(broker.client, {thread.fetch_name for thread in chosen})
    except Exception as exc:  # noqa: BLE001 - unreachable, or CLIENT not allowed (ACL)
        logger.info("could not unblock the fetches of %d stopping partition(s) (%s); they "
                    "stop within %.0fs", len(chosen), exc, FETCH_TIMEOUT)
