"""A partition thread's progress: the watchdog behind its lease, and what ``status`` reads.

The lease heartbeat runs in its own thread, so a partition thread stuck outside a task (a fetch
that never returns, a lock never released) would hold its partition forever. The thread stamps
every turn of its loop here; the heartbeat asks :meth:`Progress.stall` before it counts a
renewal as good, and fences the process (exit 75; the successor recovers at the head) when the
thread has not turned for ``STALL_FENCE_AFTER`` seconds outside a task body. A task body may
run as long as it likes (``task_prerun``/``task_postrun`` mark it).

The heartbeat also records when the thread last took a message (``store/progress.py``), so
``status`` shows a partition that stalls while its queue fills.
"""

from __future__ import annotations

import math
import sys
import threading
import time
import traceback
from typing import Any, Final

from ..store.keys import RedisKeys
from ..store.progress import write_progress

__all__ = ["Progress", "STALL_FENCE_AFTER"]

#: Seconds a partition thread may go without turning, outside a task body, before its
#: process is fenced; every wait of the loop is bounded far below this.
STALL_FENCE_AFTER: Final = 60.0

_current = threading.local()


def _task_started(**_: Any) -> None:
    progress = getattr(_current, "progress", None)
    if isinstance(progress, Progress):
        progress._busy += 1


def _task_ended(**_: Any) -> None:
    progress = getattr(_current, "progress", None)
    if isinstance(progress, Progress):
        progress._busy = max(0, progress._busy - 1)
        progress.turned()


def _track_task_bodies() -> None:
    """Mark task bodies on every partition thread of the process (connected once)."""
    from celery import signals

    signals.task_prerun.connect(_task_started, weak=False, dispatch_uid="cp-progress-start")
    signals.task_postrun.connect(_task_ended, weak=False, dispatch_uid="cp-progress-end")


class Progress:
    """Stamps of one partition thread, written by it and read by its lease heartbeat."""

    def __init__(self, stall_after: float = STALL_FENCE_AFTER) -> None:
        self.stall_after = stall_after
        self.turned_at = time.monotonic()
        #: Wall clock of the last message taken off the queue (or of the start of consuming).
        self.consumed_at = time.time()
        self._busy = 0
        self.thread: threading.Thread | None = None

    def turned(self) -> None:
        """The loop came round (or a bounded wait ended)."""
        self.turned_at = time.monotonic()

    def consumed(self) -> None:
        """A message was taken off the queue (or the partition starts consuming)."""
        self.consumed_at = time.time()
        self.turned()

    def bind(self) -> None:
        """The calling thread is the partition's (its task bodies count as busy)."""
        _track_task_bodies()
        self.thread = threading.current_thread()
        _current.progress = self

    def stall(self) -> str | None:
        """Why the thread counts as stalled (with where it waits), or None."""
        if self._busy:
            return None
        idle = time.monotonic() - self.turned_at
        if idle <= self.stall_after:
            return None
        return (f"its partition thread has not come round for {idle:.0f}s outside a task "
                f"(stuck waiting; the lease is given up so a fresh process takes over):\n"
                f"{self.where()}")

    def where(self) -> str:
        """The stack of the partition thread, for the log."""
        thread = self.thread
        frame = sys._current_frames().get(thread.ident) if thread and thread.ident else None
        if frame is None:
            return "(thread gone)"
        return "".join(traceback.format_stack(frame)).rstrip()

    def recorder(self, client: Any, keys: RedisKeys, queue: str, expire_ms: int) -> Any:
        """A lease heartbeat hook that records :attr:`consumed_at` in the store when it
        changed, else once a third of ``expire_ms`` (no write at every idle beat)."""
        written: list[float] = [math.nan, -math.inf]  # what was written, and when

        def record() -> None:
            now = time.monotonic()
            if self.consumed_at == written[0] and now - written[1] < expire_ms / 3000:
                return
            write_progress(client, keys, queue, self.consumed_at, expire_ms)
            written[:] = [self.consumed_at, now]

        return record
