"""The ETA hold: a message with a future ETA holds its partition, unacked, until its time
(Celery would run later messages first). A stop meanwhile sends it back to the head; then the
ETA is cleared, so Celery's strategy does not schedule it aside."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

from ..message import PartitionMessage
from .runtime import PartitionRuntime
from .stage import Stage, Verdict

__all__ = ["EtaHold", "eta_of"]

logger = logging.getLogger("celery_partitioning.worker")


def eta_of(headers: dict[str, Any]) -> float | None:
    """The ETA a message's headers carry (epoch s), None when none or unreadable."""
    raw = headers.get("eta")
    if not raw or not isinstance(raw, str):
        return None
    try:
        eta = datetime.fromisoformat(raw)
    except ValueError:
        return None
    if eta.tzinfo is None:
        eta = eta.replace(tzinfo=UTC)
    return eta.timestamp()


class EtaHold(Stage):
    """Waits for a message's ETA in place (see the module docstring)."""

    name = "ETA hold"

    def __init__(self, partition: PartitionRuntime) -> None:
        self.partition = partition

    def before(self, msg: PartitionMessage) -> Verdict:
        eta = eta_of(msg.headers)
        if eta is None:
            return Verdict.RUN
        part = self.partition
        delay = eta - time.time()
        if delay > 0:
            logger.info("%s task %s has an ETA in %.1fs: the partition waits for it (FIFO)",
                        part.label, msg.task_id, delay)
            while (left := eta - time.time()) > 0:
                if part.stopping():
                    return Verdict.BACK
                time.sleep(min(left, 0.5))
                part.progress.turned()  # waiting on purpose, not stuck
        msg.headers["eta"] = None
        return Verdict.RUN
