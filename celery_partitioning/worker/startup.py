"""Start-up steps that need Redis wait while it cannot be reached, instead of exiting.

A process started during a Sentinel failover finds no master until one is promoted, and one
started before its Redis finds the port closed. As Celery waits for its broker at start-up,
each failed attempt logs one WARNING and is retried after 0.5 s, doubling up to 5 s
(:class:`Backoff`, which a partition thread's fetch and reconnect use too).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final, TypeVar

from kombu.exceptions import OperationalError

from ..store.broker import unreachable_errors

__all__ = ["when_reachable", "Backoff", "RETRY_FIRST", "RETRY_MAX"]

#: First and longest pause between two attempts while Redis cannot be reached.
RETRY_FIRST: Final = 0.5
RETRY_MAX: Final = 5.0

T = TypeVar("T")


class Backoff:
    """Pauses between attempts at a Redis or broker that does not answer."""

    def __init__(self) -> None:
        self.pause = RETRY_FIRST

    def sleep(self) -> float:
        """Wait the current pause; returns it (the next one doubles)."""
        pause = self.pause
        time.sleep(pause)
        self.pause = min(RETRY_MAX, pause * 2)
        return pause

    def reset(self) -> None:
        self.pause = RETRY_FIRST


def when_reachable(step: Callable[[], T], say: Callable[[str], None], what: str) -> T:
    """Run ``step`` until it does not fail for want of Redis or the broker; ``say`` is told
    about every failed attempt (``what``: the step, for the message)."""
    unreachable: tuple[type[BaseException], ...] = (*unreachable_errors(), OperationalError)
    backoff = Backoff()
    while True:
        try:
            return step()
        except unreachable as exc:
            say(f"celery-partitioning: {what}: the broker or the partitioning store is "
                f"unreachable ({type(exc).__name__}: {exc}; a failover in progress?); trying "
                f"again in {backoff.pause:.1f}s")
            backoff.sleep()
