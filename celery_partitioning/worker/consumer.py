"""The Celery consumer of a partition worker: malformed messages become dead letters.

Celery's own consumer logs a message it cannot run (no task envelope, an unknown task name,
an invalid or undecodable body) and then rejects or acks it: the message is gone. A partition
worker selects this subclass (``worker_consumer``), whose four hooks store such a message in
the pool's dead letters with its raw bytes and the reason first, then ack it; the worker
goes on. Without a Redis store (or outside a partition worker) Celery's behaviour is kept.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.consumer import Consumer

from ..message import payload_of
from .runtime import current_runtime

__all__ = ["PartitionConsumer"]

logger = logging.getLogger("celery_partitioning.worker")


class PartitionConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, dead-lettering what it cannot run."""

    def _dead_letter(self, message: Any, problem: str) -> bool:
        runtime = current_runtime(self.app)
        dead_letters = runtime.dead_letters if runtime is not None else None
        if dead_letters is None:
            return False
        dead_letters.malformed(payload_of(message), problem)
        message.ack()
        return True

    def on_unknown_message(self, body: Any, message: Any) -> None:
        if not self._dead_letter(message, "not a Celery task message (no task name)"):
            super().on_unknown_message(body, message)

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        headers = message.headers if isinstance(message.headers, dict) else {}
        name = headers.get("task", "?")
        if not self._dead_letter(message, f"unknown task {name!r} (not registered in this "
                                          "worker: is its module imported?)"):
            super().on_unknown_task(body, message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        if not self._dead_letter(message, f"invalid task message: {exc}"):
            super().on_invalid_task(body, message, exc)

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        if not self._dead_letter(message, f"the body cannot be decoded "
                                          f"({message.content_type}): {exc}"):
            super().on_decode_error(message, exc)
