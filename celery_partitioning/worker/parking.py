"""The parking gate: a message whose key is parked (behind a dead letter, or while it waits out
a retry backoff) is set aside in order instead of running; and the keys of a partition in
retry backoff, released when due."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final

from ..message import PartitionMessage
from ..store.attempts import AttemptRecord
from ..store.backoff import BACKOFF_HEADER, BackoffStore
from ..store.deadletters import DeadLetterStore
from ..store.requeue import Requeue

if TYPE_CHECKING:
    from .runtime import PartitionRuntime

__all__ = ["BackoffKeys", "InFlight", "InFlightEntry", "ParkingGate", "resume_headers"]

logger = logging.getLogger("celery_partitioning.parking")

#: More messages than this passed the gate without finishing: forget the oldest.
MAX_INFLIGHT: Final = 64
#: Longest time the partition thread trusts what it knows of its keys in backoff without
#: reading the schedule again (it sets every key aside itself; this is only a safety net).
RECHECK: Final = 5.0


@dataclass(frozen=True)
class InFlightEntry:
    """What the gate saw of a message that it let run (for its dead letter, if it fails)."""

    pool: str
    key: str
    raw: str
    #: The task id's in-place retry record (JSON) as the gate read it, None if it had none.
    attempts: str | None = None
    #: False when the gate did not read the attempt record (the retry code reads it itself).
    attempts_read: bool = False
    #: The message belongs to a replay in flight: the store must hear when it is done.
    replaying: bool = True
    #: Where a message fetched from Redis waits until acked (in-transit list, item).
    in_transit: tuple[str, bytes] | None = None


class InFlight:
    """Messages let through by the gate, by task id, until they finish (one per process)."""

    def __init__(self) -> None:
        self._entries: dict[str, InFlightEntry] = {}

    def put(self, task_id: str, entry: InFlightEntry) -> None:
        while len(self._entries) >= MAX_INFLIGHT:
            self._entries.pop(next(iter(self._entries)))
        self._entries[task_id] = entry

    def get(self, task_id: str) -> InFlightEntry | None:
        return self._entries.get(task_id)

    def pop(self, task_id: str) -> InFlightEntry | None:
        return self._entries.pop(task_id, None)

    def __len__(self) -> int:
        return len(self._entries)


def resume_headers(message: PartitionMessage, attempts: str | None) -> None:
    """A message whose task id retried before it was delivered again (the worker that waited
    out an in-place retry was killed, or a copy set aside before this version): give it the
    retry count and due time of its attempt record, as the message Celery's retry publishes
    would carry them. ``task_prerun`` and ``self.request.retries`` then see the count, and
    the partition waits for the due time (the ETA hold) before the task starts."""
    record = AttemptRecord.parse(attempts)
    headers = message.message.headers
    if record is None or not isinstance(headers, dict):
        return
    try:
        carried = int(headers.get("retries") or 0)
    except (TypeError, ValueError):
        carried = 0
    if record.retries <= carried:
        return
    headers["retries"] = record.retries
    if record.resume_at > time.time() and not headers.get("eta"):
        headers["eta"] = datetime.fromtimestamp(record.resume_at, UTC).isoformat()


class ParkingGate:
    """A runtime gate: set aside (and ack) messages of parked keys; remember the others.

    Idempotent by task id: a message stored but not acked (a crash in between) is
    recognized when it comes back, and only acked.

    One ``EVALSHA`` per message (the ``check`` script), which also returns the task's
    in-place retry record, so the retry code needs no read of its own.
    """

    #: How the start-up line names this gate.
    __name__ = "parking gate"

    def __init__(self, runtime: PartitionRuntime, store: DeadLetterStore,
                 inflight: InFlight, requeue: Requeue) -> None:
        self.runtime = runtime
        self.store = store
        self.inflight = inflight
        #: How deferred messages are re-queued.
        self.requeue = requeue

    @staticmethod
    def _stale(message: PartitionMessage, attempts: str | None, replaying: bool) -> bool:
        """A delivery of a task id whose copy was set aside with its key, other than that copy."""
        if not replaying or not attempts:
            return False
        record = AttemptRecord.parse(attempts)
        return (record is not None and record.token is not None
                and message.headers.get(BACKOFF_HEADER) != record.token)

    def __call__(self, message: PartitionMessage) -> bool:
        key, pool, task_id = message.partition_key, message.partition_pool, message.task_id
        if key is None or pool is None or task_id is None:
            return False
        raw = message.payload()
        result = self.store.check(pool, key, task_id, raw, self.runtime.queue,
                                  requeue=self.requeue)
        verdict = result.verdict
        if verdict == "run" and not self._stale(message, result.attempts, result.replaying):
            resume_headers(message, result.attempts)
            self.inflight.put(task_id, InFlightEntry(pool, key, raw, attempts=result.attempts,
                                                     attempts_read=True,
                                                     replaying=result.replaying,
                                                     in_transit=message.in_transit))
            return False
        if verdict == "run":
            logger.warning("%s[%s]: an older delivery of a message whose copy waits out a retry "
                           "backoff with key %r (a crash before its ack): dropped",
                           message.task_name, task_id, key)
            message.ack()
            return True
        what = {"parked": "is parked: message set aside",
                "deferred": "is being replayed: newer message deferred behind the replay",
                "duplicate": "is parked: message already stored"}[verdict]
        logger.warning("%s[%s]: key %r of pool %s %s", message.task_name, task_id, key, pool, what)
        message.ack()
        return True


class BackoffKeys:
    """The keys of one partition waiting out a retry backoff (``store/backoff.py``).

    Only the partition's own thread sets its keys aside, so it knows when the next one is due
    and reads Redis only then (and at start, for what a predecessor left): between messages
    :meth:`between` usually costs no Redis call.
    """

    def __init__(self, runtime: PartitionRuntime, store: BackoffStore, requeue: Requeue) -> None:
        self.runtime = runtime
        self.store = store
        self.requeue = requeue
        #: When the schedule must be read next (epoch s); 0: at once.
        self.next_check = 0.0

    def set_aside(self, entry: InFlightEntry, task_id: str, record: AttemptRecord) -> None:
        """Set the key of ``entry`` aside until ``record.resume_at``, a copy of its message
        first, and save the attempt ``record``; a delivery fetched from this Redis is acked
        in the same step."""
        self.store.set_aside(entry.pool, entry.key, task_id, entry.raw, record,
                             queue=self.runtime.queue, requeue=self.requeue,
                             in_transit=entry.in_transit)
        self.next_check = min(self.next_check, record.resume_at)

    def between(self, idle: bool) -> float:
        """The partition's between-hook: let the keys that are due run again; returns the
        seconds until the next is due."""
        now = time.time()
        if now < self.next_check:
            return self.next_check - now
        wait = self.store.release_due(self.runtime.queue, requeue=self.requeue, now=now)
        self.next_check = now + min(wait, RECHECK)
        return self.next_check - now
